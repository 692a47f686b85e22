"""Ray glue: moves data and state between processes; the math lives elsewhere."""
