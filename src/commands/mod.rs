//! One module per subcommand.

pub(crate) mod bench;
pub(crate) mod device;
pub(crate) mod download;
pub(crate) mod eval;
pub(crate) mod memory;
pub(crate) mod train;
