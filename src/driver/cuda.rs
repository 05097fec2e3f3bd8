//! Placeholder: the real CUDA driver (being written).
