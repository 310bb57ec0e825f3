//! The CLI's end of the control socket: blocking, bounded, with clear errors.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{
    encode_line, Framed, LineFramer, Request, Response, ResponseFrame, MAX_RESPONSE_BYTES, PROTOCOL_VERSION,
};
use crate::exit;

/// Generous: a reload waits for the daemon to read and validate its file.
const IO_TIMEOUT: Duration = Duration::from_secs(35);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the callbox daemon is not running (no control socket at {0})")]
    NotRunning(PathBuf),
    #[error("the callbox daemon is not running (stale control socket at {0})")]
    Stale(PathBuf),
    #[error("permission denied on {0}: ask an admin to add you to the 'callbox' group (then log in again)")]
    Permission(PathBuf),
    #[error("cannot talk to the daemon at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the daemon at {path} sent an unintelligible response: {detail}")]
    Protocol { path: PathBuf, detail: String },
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotRunning(_) | Self::Stale(_) | Self::Io { .. } => exit::UNAVAILABLE,
            Self::Permission(_) => exit::NO_PERMISSION,
            Self::Protocol { .. } => exit::PROTOCOL,
        }
    }
}

/// Sends one request and returns the daemon's response (which may be an error reply).
pub fn request(socket: &Path, request: Request) -> Result<Response, ClientError> {
    let io_err = |source| ClientError::Io { path: socket.to_owned(), source };
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ClientError::NotRunning(socket.to_owned()),
        io::ErrorKind::ConnectionRefused => ClientError::Stale(socket.to_owned()),
        io::ErrorKind::PermissionDenied => ClientError::Permission(socket.to_owned()),
        _ => io_err(e),
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    (&stream).write_all(&encode_line(&request.frame())).map_err(io_err)?;

    let mut reader = BufReader::new(&stream);
    let mut framer = LineFramer::new(MAX_RESPONSE_BYTES);
    let protocol = |detail: String| ClientError::Protocol { path: socket.to_owned(), detail };
    let line = loop {
        let chunk = reader.fill_buf().map_err(io_err)?;
        if chunk.is_empty() {
            return Err(protocol("connection closed before a response".into()));
        }
        let len = chunk.len();
        match framer.push(chunk) {
            Framed::NeedMore => reader.consume(len),
            Framed::Line { line, .. } => break line,
            Framed::TooLong => return Err(protocol(format!("response exceeds {MAX_RESPONSE_BYTES} bytes"))),
        }
    };
    let frame: ResponseFrame = serde_json::from_slice(&line).map_err(|e| protocol(e.to_string()))?;
    if frame.v != PROTOCOL_VERSION {
        return Err(protocol(format!("protocol version {} (this CLI speaks {PROTOCOL_VERSION})", frame.v)));
    }
    Ok(frame.response)
}
