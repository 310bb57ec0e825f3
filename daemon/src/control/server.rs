//! The daemon's end of the control socket.
//!
//! Bounded everywhere: at most `max_connections` served at once, each request line at
//! most `max_request_bytes`, each request due within `request_timeout_secs`.
//! Authorization happens at accept time, from the kernel-reported peer identity: a
//! peer with no role is told so and closed at once and never holds a slot; slots are
//! handed out by `admission::Slots` (a reserve for admins, a cap per technician uid).
//! Each request is then checked against the role it needs.
//!
//! The socket file is watched: if it is removed or replaced (someone cleaned
//! /run, a second instance took the path) the CLI can no longer reach this
//! daemon, so the component fails and the supervisor restarts the daemon
//! through systemd rather than running on unreachable.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::admission::Slots;
use super::auth::{self, AccessPolicy};
use super::protocol::{
    decode_request, encode_line, CallerInfo, ErrorCode, Framed, LineFramer, MonitorFrame, Request, Response, Role,
};
pub use super::status::StatusSources;
use crate::config::{ReloadReport, RunningConfig};
use crate::health::{HealthBoard, HealthState, ShutdownSignal};

const COMPONENT: &str = "control";
/// How often the socket file is checked for removal or replacement.
const SOCKET_GUARD_INTERVAL: Duration = Duration::from_millis(500);
/// A client that does not read its response within this is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections whose identity is still being looked up (NSS may be slow on site);
/// more wait in the kernel's queue.
const MAX_PENDING_ADMISSION: usize = 32;
/// An identity lookup slower than this refuses the connection.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused peer's request is read before the refusal is written: enough for
/// a client that connected and wrote at once, too short to hold anything.
const REFUSAL_READ: Duration = Duration::from_millis(250);
/// A reload reads one small file; anything slower means the supervisor is stuck.
const RELOAD_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another callbox daemon is already listening on {0}")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create socket directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot bind control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set permissions on control socket {path}: {source}")]
    Permissions { path: PathBuf, source: io::Error },
    #[error("control socket {0} was removed or replaced by another file; the CLI can no longer reach this daemon")]
    SocketLost(PathBuf),
}

/// A reload request from a client, answered by the supervisor.
pub type ReloadReply = oneshot::Sender<Result<ReloadReport, String>>;

/// What the server needs from the rest of the daemon: narrow handles, one per subsystem
/// it serves, and what `status` reads.
#[derive(Clone)]
pub struct ControlContext {
    pub config: watch::Receiver<Arc<RunningConfig>>,
    pub health: HealthBoard,
    pub status: StatusSources,
    /// Start/stop requests for ALSA capture lines; None when capture is off.
    pub line_requests: Option<crate::inputs::alsa::LineRequests>,
    pub customers: crate::customers::Customers,
    /// The encrypted call store; None when `store.enabled` is off.
    pub vault: Option<crate::store::live::CallVault>,
    /// The headquarters uplink's view; None when `[hq]` is off.
    pub uplink: Option<crate::uplink::link::UplinkHandle>,
    /// The speech path, for a call's campaign hotwords; None when speech is off.
    pub speech: Option<crate::speech::live::SpeechService>,
    /// The understanding bus, for `watch`; None when speech is off.
    pub monitor: Option<tokio::sync::broadcast::Sender<Arc<crate::understanding::live::Monitor>>>,
    /// Reload requests go to the supervisor; bounded, senders wait (reloads are rare).
    pub reload_tx: mpsc::Sender<ReloadReply>,
}

/// Outbox rows' metadata, from the store thread.
async fn hq_outbox(ctx: &ControlContext, lane: Option<String>, limit: Option<u32>) -> Response {
    let (Some(vault), Some(_)) = (&ctx.vault, &ctx.uplink) else {
        return Response::error(ErrorCode::Rejected, "the headquarters uplink is off (hq.brokers is empty)");
    };
    let lane = match lane.as_deref().map(crate::uplink::outbox::Lane::parse) {
        None => None,
        Some(Some(lane)) => Some(lane),
        Some(None) => {
            return Response::error(
                ErrorCode::BadRequest,
                "lane: one of alert, compliance, calls, aggregates, diagnostics",
            )
        }
    };
    let limit = limit.unwrap_or(100).min(1000) as usize;
    match vault.run(move |s| s.outbox_entries(lane, limit)).await {
        Ok(entries) => Response::HqOutbox(super::convert::hq_outbox(entries)),
        Err(e) => Response::error(ErrorCode::Internal, e.to_string()),
    }
}

/// A bound control socket and the identity of its file.
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    identity: (u64, u64),
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Binds the control socket: creates its directory, replaces a stale socket,
/// refuses to steal a live one, sets mode 0660 and the technician group.
pub fn bind(path: &Path, technician_group: &str) -> Result<BoundSocket, ControlError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|source| ControlError::CreateDir { path: dir.to_owned(), source })?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket(path.to_owned()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::AlreadyRunning(path.to_owned()));
            }
            // Left by a daemon that died without cleaning up.
            let _ = std::fs::remove_file(path);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(ControlError::Bind { path: path.to_owned(), source }),
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind { path: path.to_owned(), source })?;
    let perm_err = |source| ControlError::Permissions { path: path.to_owned(), source };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(perm_err)?;
    // chown changes the group, not the file's identity: one stat serves both.
    let meta = std::fs::symlink_metadata(path).map_err(perm_err)?;
    let created_gid = meta.gid();
    let group = nix::unistd::Group::from_name(technician_group).ok().flatten();
    // Under systemd the socket is born with the right group; skip chown(2) then,
    // which the unit's syscall filter refuses.
    if let Some(group) = group.filter(|g| g.gid.as_raw() != created_gid) {
        if let Err(e) = nix::unistd::chown(path, None, Some(group.gid)) {
            log::warn!(component = COMPONENT;
                "cannot give control socket {} to group {technician_group}: {e}; technicians may be unable to connect",
                path.display());
        }
    }
    Ok(BoundSocket { listener, path: path.to_owned(), identity: (meta.dev(), meta.ino()) })
}

fn socket_still_ours(bound: &BoundSocket) -> bool {
    std::fs::symlink_metadata(&bound.path).is_ok_and(|m| (m.dev(), m.ino()) == bound.identity)
}

/// Serves the control socket until shutdown; then stops accepting, removes the
/// socket file and lets in-flight requests finish.
pub async fn serve(bound: BoundSocket, ctx: ControlContext, mut shutdown: ShutdownSignal) -> Result<(), ControlError> {
    let (max_connections, per_uid) = {
        let control = &ctx.config.borrow().config.control;
        (control.max_connections, control.max_connections_per_uid)
    };
    let slots = Arc::new(std::sync::Mutex::new(Slots::new(max_connections, per_uid)));
    let pending = Arc::new(Semaphore::new(MAX_PENDING_ADMISSION));
    let mut connections = JoinSet::new();
    let mut guard = tokio::time::interval(SOCKET_GUARD_INTERVAL);
    guard.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ctx.health.set(COMPONENT, HealthState::Ok, format!("listening on {}", bound.path.display()));
    log::info!(component = COMPONENT; "listening on {} (max {max_connections} connections, {per_uid} per technician)", bound.path.display());

    let result = loop {
        tokio::select! {
            _ = shutdown.wait() => break Ok(()),
            _ = guard.tick() => {
                if !socket_still_ours(&bound) {
                    break Err(ControlError::SocketLost(bound.path.clone()));
                }
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = async {
                let permit = pending.clone().acquire_owned().await;
                (permit, bound.listener.accept().await)
            } => {
                match accepted {
                    (Ok(permit), Ok((stream, _))) => {
                        let (ctx, shutdown, slots) = (ctx.clone(), shutdown.clone(), slots.clone());
                        connections.spawn(async move { admit(stream, ctx, shutdown, slots, permit).await });
                    }
                    (_, Err(e)) => {
                        // EMFILE and friends pass; do not spin on them.
                        log::warn!(component = COMPONENT; "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    // The semaphore is never closed; a connection without a permit is dropped.
                    (Err(_), _) => log::error!(component = COMPONENT; "admission semaphore closed"),
                }
            }
        }
    };

    let state = if result.is_ok() { HealthState::Stopped } else { HealthState::Failed };
    ctx.health.set(COMPONENT, state, "not accepting connections");
    // Stop inputs: no new connections, and the path no longer leads here.
    let identity_ok = socket_still_ours(&bound);
    drop(bound.listener);
    if identity_ok {
        let _ = std::fs::remove_file(&bound.path);
    }
    // Drain: idle connections close at once, requests in progress finish.
    while connections.join_next().await.is_some() {}
    result
}

/// A slot held by one connection, given back when the connection ends.
struct SlotGuard {
    slots: Arc<std::sync::Mutex<Slots>>,
    uid: u32,
    role: Role,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.release(self.uid, self.role);
        }
    }
}

/// Decides at accept time who the peer is and whether it gets a slot; serves it if so.
async fn admit(
    stream: UnixStream,
    ctx: ControlContext,
    shutdown: ShutdownSignal,
    slots: Arc<std::sync::Mutex<Slots>>,
    pending: tokio::sync::OwnedSemaphorePermit,
) {
    let peer = match auth::peer_of(&stream) {
        Ok(peer) => peer,
        Err(e) => {
            log::warn!(component = COMPONENT; "cannot read peer credentials: {e}");
            return;
        }
    };
    // User-database lookups may go to LDAP/sssd on site: keep them off the async
    // workers, once per connection, with the config in force at connect time.
    let control = ctx.config.borrow().config.control.clone();
    let lookup_peer = peer.clone();
    let lookup = tokio::task::spawn_blocking(move || {
        let groups = auth::groups_of(&lookup_peer);
        let role = AccessPolicy::from_config(&control).role_of(lookup_peer.uid, &groups);
        (role, auth::describe_uid(lookup_peer.uid))
    });
    let Ok(Ok((role, who))) = tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await else {
        log::warn!(component = COMPONENT; "identity lookup for uid {} failed or timed out; connection closed", peer.uid);
        return;
    };
    drop(pending);
    let control = ctx.config.borrow().config.control.clone();
    let Some(role) = role else {
        log::warn!(component = COMPONENT; "refused a connection from {who}: not root, not in {} or {}", control.technician_group, control.admin_group);
        let message = format!(
            "{who} may not use callbox: only root and members of the groups '{}' (technicians) and '{}' (admins) may",
            control.technician_group, control.admin_group
        );
        return refuse(stream, Response::error(ErrorCode::Forbidden, message)).await;
    };
    let admitted = slots.lock().map_err(|_| None).and_then(|mut s| s.admit(peer.uid, role).map_err(Some));
    let slot = match admitted {
        Ok(()) => SlotGuard { slots, uid: peer.uid, role },
        Err(no) => {
            let message = no.map_or_else(|| "connection table unavailable".to_owned(), |no| no.to_string());
            log::info!(component = COMPONENT; "turned away {who}: {message}");
            return refuse(stream, Response::error(ErrorCode::Busy, message)).await;
        }
    };
    handle_connection(stream, ctx, shutdown, peer.uid, role, &who).await;
    drop(slot);
}

/// Answers a connection that gets no service and closes it. The request the client
/// already sent is read first (briefly), so that closing does not reset the connection
/// before the client reads the answer.
async fn refuse(mut stream: UnixStream, response: Response) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(REFUSAL_READ, stream.read(&mut sink)).await;
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&encode_line(&response.frame()))).await;
    let _ = stream.shutdown().await;
}

enum Next {
    Line(Vec<u8>),
    TooLong,
    Closed,
    TimedOut,
}

async fn handle_connection(
    stream: UnixStream,
    ctx: ControlContext,
    mut shutdown: ShutdownSignal,
    uid: u32,
    role: Role,
    who: &str,
) {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);

    loop {
        let running = ctx.config.borrow().clone();
        let control = &running.config.control;
        let mut framer = LineFramer::new(control.max_request_bytes);
        let deadline = Instant::now() + Duration::from_secs(control.request_timeout_secs);
        let next = loop {
            tokio::select! {
                // An idle connection is not work in progress: close it on shutdown.
                _ = shutdown.wait(), if !framer.has_partial() => break Next::Closed,
                _ = tokio::time::sleep_until(deadline) => break Next::TimedOut,
                filled = reader.fill_buf() => {
                    let chunk = match filled {
                        Ok([]) | Err(_) => break Next::Closed,
                        Ok(chunk) => chunk,
                    };
                    let len = chunk.len();
                    match framer.push(chunk) {
                        Framed::NeedMore => reader.consume(len),
                        Framed::Line { line, consumed } => {
                            reader.consume(consumed);
                            break Next::Line(line);
                        }
                        Framed::TooLong => break Next::TooLong,
                    }
                }
            }
        };
        let (response, after) = match next {
            Next::Closed => return,
            Next::TimedOut => {
                let limit = control.request_timeout_secs;
                (Response::error(ErrorCode::Timeout, format!("no complete request within {limit}s")), After::Close)
            }
            Next::TooLong => {
                log::warn!(component = COMPONENT; "refused request over {} bytes from {who}", control.max_request_bytes);
                let message = format!("request exceeds {} bytes", control.max_request_bytes);
                (Response::error(ErrorCode::RequestTooLarge, message), After::Close)
            }
            Next::Line(line) => respond(&line, role, Peer { uid, who }, &running, &ctx, &shutdown).await,
        };
        let bytes = encode_line(&response.frame());
        let written = tokio::time::timeout(WRITE_TIMEOUT, write_half.write_all(&bytes)).await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        match after {
            After::KeepOpen => {}
            After::Close => return,
            After::Watch(rx) => return stream_monitor(rx, reader, write_half, who, shutdown).await,
        }
    }
}

/// What happens to a connection after its response.
enum After {
    KeepOpen,
    Close,
    /// Stream the understanding bus until the client or the daemon goes.
    Watch(tokio::sync::broadcast::Receiver<Arc<crate::understanding::live::Monitor>>),
}

/// Writes every bus item as a line. A client that stops reading for [`WRITE_TIMEOUT`] is
/// dropped; one that falls behind the bus is told how much it missed. Either way the bus
/// itself never waits for a watcher.
async fn stream_monitor(
    mut rx: tokio::sync::broadcast::Receiver<Arc<crate::understanding::live::Monitor>>,
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut writer: tokio::net::unix::OwnedWriteHalf,
    who: &str,
    mut shutdown: ShutdownSignal,
) {
    use tokio::sync::broadcast::error::RecvError;
    // Transcripts are personal data, masked or not: say who followed them.
    log::info!(component = COMPONENT; "{who} is watching live call understanding");
    let mut sink = [0u8; 256];
    loop {
        let line = tokio::select! {
            _ = shutdown.wait() => break,
            // Anything the client sends is ignored; end of file means it left.
            read = tokio::io::AsyncReadExt::read(&mut reader, &mut sink) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            item = rx.recv() => match item {
                Ok(item) => encode_line(&MonitorFrame { v: super::protocol::PROTOCOL_VERSION, monitor: item.as_ref().into() }),
                Err(RecvError::Lagged(n)) => encode_line(&Response::error(
                    ErrorCode::Internal,
                    format!("this watcher fell behind: {n} items were skipped"),
                ).frame()),
                Err(RecvError::Closed) => break,
            },
        };
        let written = tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&line)).await;
        if !matches!(written, Ok(Ok(()))) {
            break;
        }
    }
    log::info!(component = COMPONENT; "{who} stopped watching");
}

/// The process at the other end of the socket (not a phone caller).
struct Peer<'a> {
    uid: u32,
    /// "uid 1000 (ana)", resolved once per connection.
    who: &'a str,
}

/// Decides the response to one request line and what becomes of the connection.
async fn respond(
    line: &[u8],
    role: Role,
    peer: Peer<'_>,
    running: &RunningConfig,
    ctx: &ControlContext,
    shutdown: &ShutdownSignal,
) -> (Response, After) {
    let request = match decode_request(line) {
        Ok(request) => request,
        Err(reply) => return (Response::Error(reply), After::KeepOpen),
    };
    let control = &running.config.control;
    // Logs name the request's kind, never its arguments (a caller number is personal data).
    if role < request.required_role() {
        log::warn!(component = COMPONENT; "refused {} from {}: needs the admin role", request.kind(), peer.who);
        let message = format!(
            "{} needs the admin role: root or a member of '{}'; {} is a technician",
            request.kind(),
            control.admin_group,
            peer.who
        );
        if let Some(vault) = &ctx.vault {
            // A refused request is part of the processing record (PIPL Art. 55).
            let (actor, kind) = (actor(peer.uid, role), request.kind());
            let now = crate::store::now_ms();
            if let Err(e) = vault.run(move |s| s.audit(&actor, kind, "-", "refused: needs the admin role", now)).await {
                log::error!(component = COMPONENT; "refusal not audited: {e}");
            }
        }
        return (Response::error(ErrorCode::Forbidden, message), After::KeepOpen);
    }
    log::debug!(component = COMPONENT; "{} from {} as {role:?}", request.kind(), peer.who);
    let response = match request {
        Request::Ping {} => Response::Pong,
        Request::Status {} => {
            let caller = CallerInfo { uid: peer.uid, role };
            Response::Status(Box::new(ctx.status.report(running, &ctx.health, shutdown.is_triggered(), caller)))
        }
        Request::Reload {} => reload(ctx).await,
        Request::CallStart { line } => line_request(ctx, &line, true, peer.who).await,
        Request::CallStop { line } => line_request(ctx, &line, false, peer.who).await,
        Request::CallInfo { call, caller: number, campaign, converted } => {
            call_info(ctx, call, number, campaign, converted, peer.who).await
        }
        Request::Customer { caller: number } => customer_lookup(ctx, number, peer.who).await,
        Request::CallsList { .. }
        | Request::CallsShow { .. }
        | Request::CallsExport { .. }
        | Request::CallsAudio { .. }
        | Request::CustomerForget { .. }
        | Request::AuditShow { .. }
        | Request::AuditVerify {}
        | Request::KeysRotate {}
        | Request::StoreStats {} => match &ctx.vault {
            Some(vault) => store_request(ctx, vault, request, actor(peer.uid, role), peer.who).await,
            None => Response::error(ErrorCode::Rejected, "the call store is off (store.enabled = false)"),
        },
        Request::HqStatus {} => match &ctx.uplink {
            Some(uplink) => Response::HqStatus(super::convert::hq_status(uplink.status())),
            None => Response::error(ErrorCode::Rejected, "the headquarters uplink is off (hq.brokers is empty)"),
        },
        Request::HqOutbox { lane, limit } => hq_outbox(ctx, lane, limit).await,
        Request::Watch {} => match &ctx.monitor {
            Some(bus) => return (Response::Watching, After::Watch(bus.subscribe())),
            None => {
                Response::error(ErrorCode::Rejected, "call understanding is off (no input, or speech.enabled = false)")
            }
        },
    };
    (response, After::KeepOpen)
}

fn actor(uid: u32, role: Role) -> crate::store::Actor {
    let role = match role {
        Role::Technician => "technician",
        Role::Admin => "admin",
    };
    crate::store::Actor { uid, role: role.into() }
}

/// Most calls one `calls list` returns, and most audit entries one `audit show` sends
/// (the newest): replies stay under the CLI's 1 MiB.
const MAX_LISTED: u32 = 1000;
const MAX_AUDIT_ENTRIES: usize = 2000;

/// The call-store requests. Every decrypting one is audited by the store before it
/// decrypts; erasure and rotation audit themselves too.
async fn store_request(
    ctx: &ControlContext,
    vault: &crate::store::live::CallVault,
    request: Request,
    actor: crate::store::Actor,
    who: &str,
) -> Response {
    use crate::control::protocol as wire;
    let now = crate::store::now_ms();
    let result: Result<Response, crate::store::StoreError> = match request {
        Request::CallsList { since_unix_ms, caller, event, limit } => {
            let customer = match caller.map(|c| ctx.customers.customer_id(&c)).transpose() {
                Ok(c) => c,
                Err(e) => return Response::error(ErrorCode::Rejected, e.to_string()),
            };
            let filter = crate::store::CallFilter {
                since_unix_ms,
                customer,
                event,
                limit: i64::from(limit.unwrap_or(100).clamp(1, MAX_LISTED)),
            };
            vault.run(move |s| s.list(&filter)).await.map(|calls| {
                Response::Calls(wire::CallsReply { calls: calls.into_iter().map(Into::into).collect() })
            })
        }
        Request::CallsShow { call, transcript: false } => vault.run(move |s| s.summary(&call)).await.map(|c| {
            Response::StoredCall(Box::new(wire::StoredCallReply { call: c.into(), utterances: vec![] }))
        }),
        Request::CallsShow { call, transcript: true } => decrypt(vault, call, actor, "transcript_read", now, who).await,
        Request::CallsExport { call } => decrypt(vault, call, actor, "export", now, who).await,
        Request::CallsAudio { call, leg, from_chunk } => {
            let leg = match leg.as_str() {
                "customer" => crate::audio::Leg::Customer,
                "agent" => crate::audio::Leg::Agent,
                other => return Response::error(ErrorCode::BadRequest, format!("leg {other:?}: customer or agent")),
            };
            let id = call.clone();
            let page = wire::MAX_AUDIO_PAGE_BYTES;
            match vault.run(move |s| s.audio(&id, leg, from_chunk, page, &actor, now)).await {
                Ok(audio) => {
                    log::info!(component = COMPONENT, call_id = call.as_str(); "{who} read {} bytes of {} audio", audio.mulaw.len(), leg.name());
                    Ok(Response::CallAudio(wire::CallAudioReply {
                        call,
                        leg: leg.name().into(),
                        rate: audio.rate,
                        mulaw_hex: crate::hex::encode(&audio.mulaw),
                        complete: audio.complete,
                        next_chunk: audio.next,
                    }))
                }
                Err(e) => Err(e),
            }
        }
        Request::CustomerForget { caller } => {
            let customer = match ctx.customers.customer_id(&caller) {
                Ok(c) => c,
                Err(e) => return Response::error(ErrorCode::Rejected, e.to_string()),
            };
            // Calls first (keys shredded, content deleted, tombstone), then the customer
            // store's rows; both are idempotent, so a failure half-way is fixed by repeating.
            let id = customer.clone();
            match vault.run(move |s| s.forget(&id, &actor, now)).await {
                Ok(forgotten) => match ctx.customers.forget(&customer).await {
                    Ok(rows) => {
                        log::info!(component = COMPONENT; "{who} erased customer {customer}: {} calls, {rows} customer rows", forgotten.calls);
                        Ok(Response::Forgotten(wire::ForgottenReply {
                            customer,
                            calls: forgotten.calls,
                            customer_rows: rows,
                            first_time: forgotten.first_time,
                        }))
                    }
                    Err(e) => return Response::error(ErrorCode::Internal, format!("customer store: {e}; repeat the request")),
                },
                Err(e) => Err(e),
            }
        }
        Request::AuditShow { since_unix_ms } => vault.run(move |s| s.audit_entries(since_unix_ms)).await.map(|mut entries| {
            let omitted = entries.len().saturating_sub(MAX_AUDIT_ENTRIES);
            entries.drain(..omitted);
            Response::Audit(wire::AuditReply { entries: entries.into_iter().map(Into::into).collect(), omitted })
        }),
        Request::AuditVerify {} => vault.run(|s| s.audit_verify()).await.map(|verdict| {
            Response::AuditVerified(match verdict {
                Ok(entries) => wire::AuditVerifyReply { ok: true, entries, broken_seq: None, why: None },
                Err(broken) => wire::AuditVerifyReply {
                    ok: false,
                    entries: usize::try_from(broken.seq.saturating_sub(1)).unwrap_or(0),
                    broken_seq: Some(broken.seq),
                    why: Some(broken.why),
                },
            })
        }),
        Request::KeysRotate {} => vault.rotate_master_key().await.map(|(keys, master_key)| {
            log::info!(component = COMPONENT; "{who} rotated the master key: {keys} call keys re-wrapped, now key {master_key}");
            Response::KeysRotated(wire::KeysRotatedReply { keys, master_key })
        }),
        Request::StoreStats {} => {
            let counters = vault.counters();
            vault.run(|s| s.stats()).await.map(|stats| Response::StoreStats(super::convert::store_stats(stats, counters)))
        }
        other => return Response::error(ErrorCode::Internal, format!("{} is not a call-store request", other.kind())),
    };
    match result {
        Ok(response) => response,
        Err(crate::store::StoreError::NoSuchCall(call)) => {
            Response::error(ErrorCode::Rejected, format!("no call {call} in the store"))
        }
        Err(e) => {
            log::error!(component = COMPONENT; "call store request from {who}: {e}");
            Response::error(ErrorCode::Internal, format!("call store: {e}; see `callbox doctor` and the log"))
        }
    }
}

/// A decrypting read (`calls show --transcript`, `calls export`): the store audits it
/// before it decrypts, and refuses to decrypt if the audit entry cannot be written.
async fn decrypt(
    vault: &crate::store::live::CallVault,
    call: String,
    actor: crate::store::Actor,
    action: &'static str,
    now: i64,
    who: &str,
) -> Result<Response, crate::store::StoreError> {
    let id = call.clone();
    let transcript = vault.run(move |s| s.decrypt_call(&id, &actor, action, now)).await?;
    log::info!(component = COMPONENT, call_id = call.as_str(); "{who}: {action} of a stored call");
    Ok(Response::StoredCall(Box::new(transcript.into())))
}

async fn call_info(
    ctx: &ControlContext,
    call: String,
    number: Option<String>,
    campaign: Option<String>,
    converted: Option<bool>,
    who: &str,
) -> Response {
    if let Some(Err(problem)) = campaign.as_deref().map(crate::config::check_campaign_name) {
        return Response::error(ErrorCode::BadRequest, format!("campaign: {problem}"));
    }
    let converted = converted == Some(true);
    let done = ctx.customers.call_info(&call, number.as_deref(), converted).await;
    if let (Some(speech), Some(name), Ok(_)) = (&ctx.speech, &campaign, &done) {
        let terms = ctx.config.borrow().config.speech.hotwords_for(Some(name));
        speech.set_call_hotwords(&call, terms);
    }
    if let (Some(vault), Ok(_)) = (&ctx.vault, &done) {
        let customer = number.as_deref().and_then(|n| ctx.customers.customer_id(n).ok());
        if customer.is_some() || converted || campaign.is_some() {
            let info = crate::store::CallInfo { customer, converted, campaign: campaign.clone(), ..Default::default() };
            if let Err(e) = vault.write(crate::store::StoreOp::Describe { call: call.clone(), info }).await {
                log::error!(component = COMPONENT, call_id = call.as_str(); "call info not kept in the call store: {e}");
            }
        }
    }
    if done.is_ok() && (number.is_some() || converted || campaign.is_some()) {
        log::info!(component = COMPONENT, call_id = call.as_str();
            "call info from {who}:{}{}{}", if number.is_some() { " caller number" } else { "" },
            campaign.as_deref().map(|c| format!(" campaign {}", crate::escape::escape(c))).unwrap_or_default(),
            if converted { " converted" } else { "" });
    }
    customer_reply(done)
}

async fn customer_lookup(ctx: &ControlContext, number: String, who: &str) -> Response {
    let found = ctx.customers.by_caller(&number).await;
    customer_reply(found.inspect(|customer| {
        log::info!(component = COMPONENT; "{who} looked up customer {}",
            customer.as_ref().map_or("(unknown)", |c| c.customer.as_str()));
    }))
}

/// The reply to a customer-store request: bad input is the caller's to fix (rejected with
/// the reason); anything else is the store's fault, logged here.
fn customer_reply(
    result: Result<Option<crate::customers::CustomerRecord>, crate::customers::CustomerError>,
) -> Response {
    match result {
        Ok(customer) => Response::Customer(super::protocol::CustomerReply { customer: customer.map(Into::into) }),
        Err(crate::customers::CustomerError::BadInput(message)) => Response::error(ErrorCode::Rejected, message),
        Err(e) => {
            log::error!(component = COMPONENT; "customer store: {e}");
            Response::error(ErrorCode::Internal, format!("customer store: {e}; see `callbox doctor` and the log"))
        }
    }
}

async fn line_request(ctx: &ControlContext, line: &str, start: bool, who: &str) -> Response {
    if line.len() > crate::control::protocol::MAX_LINE_NAME {
        return Response::error(
            ErrorCode::BadRequest,
            format!("line names have at most {} characters", crate::control::protocol::MAX_LINE_NAME),
        );
    }
    let Some(requests) = &ctx.line_requests else {
        return Response::error(ErrorCode::Rejected, "ALSA capture is off (alsa.device is not set)");
    };
    match requests.send(line, start).await {
        Ok(call) => {
            let verb = if start { "started" } else { "stopped" };
            log::info!(component = COMPONENT, call_id = call.as_str(); "call on line {line} {verb} at the request of {who}");
            Response::Call(crate::control::protocol::CallReply { line: line.to_owned(), call, started: start })
        }
        Err(e) => Response::error(ErrorCode::Rejected, e.to_string()),
    }
}

async fn reload(ctx: &ControlContext) -> Response {
    let (tx, rx) = oneshot::channel();
    if ctx.reload_tx.send(tx).await.is_err() {
        return Response::error(ErrorCode::ShuttingDown, "the daemon is shutting down");
    }
    match tokio::time::timeout(RELOAD_REPLY_TIMEOUT, rx).await {
        Ok(Ok(Ok(report))) => Response::Reload(report.into()),
        Ok(Ok(Err(message))) => Response::error(ErrorCode::ShuttingDown, message),
        Ok(Err(_)) => Response::error(ErrorCode::ShuttingDown, "the daemon is shutting down"),
        Err(_) => Response::error(ErrorCode::Internal, "the supervisor did not answer the reload in time"),
    }
}
