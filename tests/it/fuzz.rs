//! Property-based tests: random and mutated frames for the protocol decoder and a live reader.
