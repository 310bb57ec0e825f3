//! IO adapters that bring call audio in. Each is a supervised component.

pub mod audiosocket;
pub mod spool;
