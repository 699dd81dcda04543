"""How good the served predictions are: agreement between a prediction and the annotation that
followed it, the ledger that keeps it per model version, and the log of Label Studio's webhook events.

May import: core, state.
"""
