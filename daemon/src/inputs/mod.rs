//! IO adapters that bring call audio in. Each is a supervised component.

pub mod alsa;
pub mod audiosocket;
pub mod lines;
pub mod spool;
