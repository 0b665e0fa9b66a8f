"""Native crashes past the facts: module identity, symbols, stack walking and signatures."""
