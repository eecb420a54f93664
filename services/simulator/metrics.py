"""simulator's metrics, all of them."""

from prometheus_client import Counter

RECEIVED = Counter("dercmd_simulator_commands_received_total", "Commands simulated devices received, by backend.", ["backend"])
CALLBACK_ERRORS = Counter("dercmd_simulator_callback_errors_total", "Results the simulator could not deliver to the caller.")
REPORTS = Counter(
    "dercmd_simulator_reports_total", "Measurement reports simulated devices made, by backend and trigger (periodic, requested).",
    ["backend", "trigger"],
)
REPORT_POSTS = Counter("dercmd_simulator_report_posts_total", "POSTs of periodic reports to the subscriber, by backend.", ["backend"])
REPORT_ERRORS = Counter(
    "dercmd_simulator_report_errors_total", "Periodic reports the simulator could not deliver to the subscriber, by backend.", ["backend"]
)
FAULTS = Counter("dercmd_simulator_faults_total", "Faults injected into calls to simulated devices, by kind.", ["kind"])
