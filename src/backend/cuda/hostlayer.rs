//! Rust side of the host execution layer. (In progress.)
