//! tokenscope: exact next-token distributions of causal language models.

pub mod model;
