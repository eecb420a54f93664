"""The Redis state: every key, hash field and Lua script dercmd keeps in Redis lives in this
package, and nothing outside it names one. Each module owns one kind of state and hands out
typed values; its docstring lists its keys, their fields, who writes and who reads.
"""
