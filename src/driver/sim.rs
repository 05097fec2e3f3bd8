//! Placeholder: the simulated driver (being written).
