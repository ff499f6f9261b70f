"""Release-time analysis: compression, profiling, audits, OOD fitting, packaging, reports."""
