"""simulator's metrics, all of them."""

from prometheus_client import Counter

RECEIVED = Counter("dercmd_simulator_commands_received_total", "Commands simulated devices received, by backend.", ["backend"])
CALLBACK_ERRORS = Counter("dercmd_simulator_callback_errors_total", "Results the simulator could not deliver to the caller.")
