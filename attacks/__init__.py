"""Attack adapters over ART: evasion (attacks.evasion, attacks.estimators) and model extraction."""
