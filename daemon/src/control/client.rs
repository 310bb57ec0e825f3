//! The CLI's end of the control socket: blocking, bounded, with clear errors.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{
    encode_line, ErrorReply, Framed, LineFramer, MonitorFrame, MonitorItem, Request, Response, ResponseFrame,
    MAX_RESPONSE_BYTES, PROTOCOL_VERSION,
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
    #[error("the daemon at {0} is busy (its queue of new connections is full); try again in a moment")]
    Busy(PathBuf),
    #[error("cannot talk to the daemon at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the daemon at {path} sent an unintelligible response: {detail}")]
    Protocol { path: PathBuf, detail: String },
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotRunning(_) | Self::Stale(_) | Self::Busy(_) | Self::Io { .. } => exit::UNAVAILABLE,
            Self::Permission(_) => exit::NO_PERMISSION,
            Self::Protocol { .. } => exit::PROTOCOL,
        }
    }
}

fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ClientError::NotRunning(socket.to_owned()),
        io::ErrorKind::ConnectionRefused => ClientError::Stale(socket.to_owned()),
        io::ErrorKind::PermissionDenied => ClientError::Permission(socket.to_owned()),
        // A Unix socket whose accept queue is full says EAGAIN, not "wait".
        io::ErrorKind::WouldBlock => ClientError::Busy(socket.to_owned()),
        _ => ClientError::Io { path: socket.to_owned(), source: e },
    })?;
    let io_err = |source| ClientError::Io { path: socket.to_owned(), source };
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    Ok(stream)
}

/// The next line from the daemon, bounded; None at end of stream.
fn read_line(reader: &mut BufReader<&UnixStream>, socket: &Path) -> Result<Option<Vec<u8>>, ClientError> {
    let mut framer = LineFramer::new(MAX_RESPONSE_BYTES);
    loop {
        let chunk = reader.fill_buf().map_err(|source| ClientError::Io { path: socket.to_owned(), source })?;
        if chunk.is_empty() {
            return Ok(None);
        }
        let len = chunk.len();
        match framer.push(chunk) {
            Framed::NeedMore => reader.consume(len),
            Framed::Line { line, consumed } => {
                reader.consume(consumed);
                return Ok(Some(line));
            }
            Framed::TooLong => {
                return Err(ClientError::Protocol {
                    path: socket.to_owned(),
                    detail: format!("response exceeds {MAX_RESPONSE_BYTES} bytes"),
                })
            }
        }
    }
}

fn parse_response(line: &[u8], socket: &Path) -> Result<Response, ClientError> {
    let protocol = |detail: String| ClientError::Protocol { path: socket.to_owned(), detail };
    let frame: ResponseFrame = serde_json::from_slice(line).map_err(|e| protocol(e.to_string()))?;
    if frame.v != PROTOCOL_VERSION {
        return Err(protocol(format!("protocol version {} (this CLI speaks {PROTOCOL_VERSION})", frame.v)));
    }
    Ok(frame.response)
}

/// Sends one request and returns the daemon's response (which may be an error reply).
pub fn request(socket: &Path, request: Request) -> Result<Response, ClientError> {
    let stream = connect(socket)?;
    let sent = (&stream).write_all(&encode_line(&request.frame()));
    let mut reader = BufReader::new(&stream);
    // The daemon may have answered (refused or busy) and closed before reading the
    // request: its answer is still there to read, and says more than EPIPE.
    let line = match (sent, read_line(&mut reader, socket)) {
        (_, Ok(Some(line))) => Some(line),
        (Err(source), _) => return Err(ClientError::Io { path: socket.to_owned(), source }),
        (Ok(()), other) => other?,
    };
    match line {
        Some(line) => parse_response(&line, socket),
        None => {
            Err(ClientError::Protocol { path: socket.to_owned(), detail: "connection closed before a response".into() })
        }
    }
}

/// One line of a `watch` stream: an item of the understanding bus, or an error the daemon
/// says mid-stream (this watcher fell behind).
#[derive(Debug, Clone, PartialEq)]
pub enum WatchLine {
    Item(Box<MonitorItem>),
    Error(ErrorReply),
}

/// Follows the daemon's understanding bus: `on_item` gets each line until it returns
/// false or the daemon closes. Err(reply) if the daemon refused to stream.
pub fn watch(socket: &Path, mut on_item: impl FnMut(WatchLine) -> bool) -> Result<Result<(), Response>, ClientError> {
    let stream = connect(socket)?;
    let io_err = |source| ClientError::Io { path: socket.to_owned(), source };
    let sent = (&stream).write_all(&encode_line(&Request::Watch {}.frame()));
    let mut reader = BufReader::new(&stream);
    let first = match (sent, read_line(&mut reader, socket)) {
        (_, Ok(Some(line))) => Some(line),
        (Err(source), _) => return Err(io_err(source)),
        (Ok(()), other) => other?,
    };
    let Some(first) = first else {
        return Err(ClientError::Protocol {
            path: socket.to_owned(),
            detail: "connection closed before a response".into(),
        });
    };
    match parse_response(&first, socket)? {
        Response::Watching => {}
        other => return Ok(Err(other)),
    }
    // Items come when calls do: no read timeout from here on.
    stream.set_read_timeout(None).map_err(io_err)?;
    while let Some(line) = read_line(&mut reader, socket)? {
        let item = match serde_json::from_slice::<MonitorFrame>(&line) {
            Ok(frame) => WatchLine::Item(Box::new(frame.monitor)),
            Err(e) => match parse_response(&line, socket) {
                Ok(Response::Error(reply)) => WatchLine::Error(reply),
                _ => {
                    let detail = format!("not a monitor line: {e}");
                    return Err(ClientError::Protocol { path: socket.to_owned(), detail });
                }
            },
        };
        if !on_item(item) {
            break;
        }
    }
    Ok(Ok(()))
}

/// A refusal from the daemon as the CLI's failure, with the exit code that says which kind.
pub fn refused(reply: super::protocol::ErrorReply) -> exit::Failure {
    use crate::control::protocol::ErrorCode::*;
    let code = match reply.code {
        Forbidden => exit::NO_PERMISSION,
        UnsupportedVersion | BadRequest | RequestTooLarge => exit::PROTOCOL,
        ShuttingDown | Busy => exit::UNAVAILABLE,
        Rejected | Timeout | Internal => exit::FAILURE,
    };
    exit::Failure::new(code, format!("the daemon refused: {}", reply.message))
}

pub fn unexpected(response: &Response) -> exit::Failure {
    exit::Failure::new(exit::PROTOCOL, format!("unexpected response from the daemon: {response:?}"))
}

/// Sends one request; a refusal or a transport failure is the command's failure.
pub fn ask(socket: &Path, request: Request) -> Result<Response, exit::Failure> {
    match self::request(socket, request)? {
        Response::Error(reply) => Err(refused(reply)),
        response => Ok(response),
    }
}
