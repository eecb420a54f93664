"""dispatch: delivers dispatch orders through device backends; emits Sent/Succeeded/Failed."""
