//! A request to stop training, set by the command line's SIGINT and SIGTERM handlers (from
//! inside a signal handler, so only an atomic store) and checked by training after every step:
//! the run then stops with an error before the next step, leaving its last checkpoint as it is.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// The number of the signal that asked training to stop (0: none).
pub fn flag() -> &'static Arc<AtomicUsize> {
    static FLAG: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
    FLAG.get_or_init(Default::default)
}

/// The signal that asked training to stop, if one did.
pub fn requested() -> Option<i32> {
    match flag().load(Ordering::SeqCst) {
        0 => None,
        s => Some(s as i32),
    }
}
