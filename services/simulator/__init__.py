"""simulator: device backends speaking real protocols, recording what each device received."""
