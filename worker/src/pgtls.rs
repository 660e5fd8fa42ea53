//! The old path of [`crate::store::tls`], kept so callers outside the store need no change.

pub use crate::store::tls::*;
