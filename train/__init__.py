"""torch side of tinyi2v: reference models, training and export. Never imported by the runtime."""
