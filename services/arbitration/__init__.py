"""arbitration: cooldown and slot rules, atomically in Redis; emits dispatch orders."""
