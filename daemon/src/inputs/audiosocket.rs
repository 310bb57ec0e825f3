//! AudioSocket over TCP: one connection per call leg, from Asterisk's
//! `AudioSocket(uuid,host:port)`. Framing is `audio::audiosocket`'s; this is
//! the socket side. A bad connection is closed with its reason logged and
//! never affects another.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::audio::audiosocket::{encode, format_uuid, Frame, FrameDecoder};
use crate::audio::Leg;
use crate::calls::registry::CallRegistry;
use crate::config::RunningConfig;
use crate::health::{HealthBoard, HealthState, ShutdownSignal};
use crate::speech::live::{LegFeed, SpeechService};

const COMPONENT: &str = "audiosocket";
/// Open connections per listener, whatever state they are in; beyond this new ones
/// wait. Each listener has its own, so a flood on one leaves the other's calls served.
const MAX_CONNECTIONS_PER_LISTENER: usize = 256;

/// Open streams per source address, across listeners: one host cannot take every slot.
#[derive(Clone, Default)]
struct PeerCounts(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, PeerCount>>>);

#[derive(Default)]
struct PeerCount {
    open: usize,
    /// Said in the log that this peer is at its limit (once, until it drops below).
    warned: bool,
}

/// One stream counted against its peer; uncounted when dropped.
struct PeerSlot {
    counts: PeerCounts,
    ip: std::net::IpAddr,
}

impl PeerCounts {
    /// Counts a stream from `ip`, or Err when it already holds `limit`; the bool says
    /// whether to log it (the first refusal since the peer reached its limit).
    fn take(&self, ip: std::net::IpAddr, limit: usize) -> Result<PeerSlot, bool> {
        let Ok(mut counts) = self.0.lock() else { return Err(false) };
        let count = counts.entry(ip).or_default();
        if count.open >= limit {
            let first = !count.warned;
            count.warned = true;
            return Err(first);
        }
        count.open += 1;
        Ok(PeerSlot { counts: self.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.0.lock() {
            if let Some(count) = counts.get_mut(&self.ip) {
                count.open -= 1;
                count.warned = false;
                if count.open == 0 {
                    counts.remove(&self.ip);
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AudioSocketError {
    #[error("cannot listen for AudioSocket on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
}

/// A bound listener and the leg its streams carry.
pub struct BoundListener {
    listener: TcpListener,
    pub address: SocketAddr,
    pub leg: Leg,
}

/// Binds every configured listener (at start-up, so a taken port fails the start).
pub async fn bind(config: &crate::config::AudioSocketConfig) -> Result<Vec<BoundListener>, AudioSocketError> {
    let mut out = Vec::new();
    for l in &config.listeners {
        let listener = TcpListener::bind(l.address)
            .await
            .map_err(|source| AudioSocketError::Bind { address: l.address, source })?;
        let address = listener.local_addr().map_err(|source| AudioSocketError::Bind { address: l.address, source })?;
        out.push(BoundListener { listener, address, leg: l.leg });
    }
    Ok(out)
}

/// Serves every listener until shutdown, then closes all streams.
pub async fn serve(
    listeners: Vec<BoundListener>,
    config: watch::Receiver<Arc<RunningConfig>>,
    calls: CallRegistry,
    speech: Option<SpeechService>,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), AudioSocketError> {
    let described: Vec<String> =
        listeners.iter().map(|l| format!("{} ({:?})", l.address, l.leg).to_lowercase()).collect();
    health.set(COMPONENT, HealthState::Ok, format!("listening on {}", described.join(", ")));
    if config.borrow().config.audiosocket.allowed_peers.is_empty() {
        log::warn!(component = COMPONENT; "audiosocket.allowed_peers is empty: any host may stream audio in");
    }
    log::info!(component = COMPONENT; "listening on {}", described.join(", "));
    let peers = PeerCounts::default();
    let mut accept_loops = JoinSet::new();
    for l in listeners {
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS_PER_LISTENER));
        let (config, calls, shutdown, peers) = (config.clone(), calls.clone(), shutdown.clone(), peers.clone());
        accept_loops.spawn(accept_loop(l, config, calls, speech.clone(), shutdown, permits, peers));
    }
    shutdown.wait().await;
    // Each loop stops accepting and closes its streams; wait for them all.
    while accept_loops.join_next().await.is_some() {}
    health.set(COMPONENT, HealthState::Stopped, "not accepting streams");
    Ok(())
}

async fn accept_loop(
    bound: BoundListener,
    config: watch::Receiver<Arc<RunningConfig>>,
    calls: CallRegistry,
    speech: Option<SpeechService>,
    mut shutdown: ShutdownSignal,
    permits: Arc<tokio::sync::Semaphore>,
    peers: PeerCounts,
) {
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            accepted = async {
                let permit = permits.clone().acquire_owned().await;
                (permit, bound.listener.accept().await)
            } => match accepted {
                (Ok(permit), Ok((stream, peer))) => {
                    let (settings, speech_config) = {
                        let running = config.borrow();
                        (running.config.audiosocket.clone(), running.config.speech.clone())
                    };
                    if !settings.allowed_peers.is_empty() && !settings.allowed_peers.contains(&peer.ip()) {
                        log::warn!(component = COMPONENT; "refused AudioSocket connection from {peer}: not in audiosocket.allowed_peers");
                        continue;
                    }
                    let peer_slot = match peers.take(peer.ip(), settings.max_connections_per_peer) {
                        Ok(slot) => slot,
                        Err(first) => {
                            if first {
                                log::warn!(component = COMPONENT; "{} holds {} AudioSocket streams (audiosocket.max_connections_per_peer); refusing more from it",
                                    peer.ip(), settings.max_connections_per_peer);
                            }
                            continue;
                        }
                    };
                    let (calls, shutdown) = (calls.clone(), shutdown.clone());
                    let speech = speech.clone().map(|service| (service, speech_config));
                    let leg = bound.leg;
                    streams.spawn(async move {
                        handle_stream(stream, peer, leg, settings, calls, speech, shutdown).await;
                        drop(peer_slot);
                        drop(permit);
                    });
                }
                (_, Err(e)) => {
                    log::warn!(component = COMPONENT; "accept on {} failed: {e}", bound.address);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (Err(_), _) => log::error!(component = COMPONENT; "connection semaphore closed"),
            }
        }
    }
    drop(bound.listener);
    while streams.join_next().await.is_some() {}
}

/// Why a stream ended: for the log and the leg's summary.
enum End {
    /// A normal end: hangup, close, shutdown.
    Reason(String),
    /// The peer broke the protocol or went silent: logged as a warning.
    Fault(String),
    Refused(String),
}

async fn handle_stream(
    mut stream: TcpStream,
    peer: SocketAddr,
    leg: Leg,
    settings: crate::config::AudioSocketConfig,
    calls: CallRegistry,
    speech: Option<(SpeechService, crate::config::SpeechConfig)>,
    mut shutdown: ShutdownSignal,
) {
    let idle = Duration::from_secs(settings.idle_timeout_secs);
    let mut decoder = FrameDecoder::new(settings.max_frame_bytes);
    let mut buf = vec![0u8; 16 * 1024];
    let mut guard = None;
    // Opened at the first audio frame, whose kind gives the rate; (feed, rate).
    let mut feed: Option<(LegFeed, u32)> = None;
    // Asterisk's AudioSocket expects audio back and ends a socket that stays silent
    // towards it: once the call is admitted, 20 ms of silence goes back every 20 ms, at
    // the rate the PBX sends (8 kHz until its first audio frame).
    let mut keepalive = tokio::time::interval(SILENCE_EVERY);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut silence_rate, mut silence) = (8000, silence_frame(8000));
    // The idle timer runs from the last complete frame, not the last byte: a peer
    // dribbling bytes that never make a frame cannot keep a slot. A frame once begun
    // must also be whole within `frame_timeout_ms`.
    let frame_bound = Duration::from_millis(settings.frame_timeout_ms);
    let mut last_frame = tokio::time::Instant::now();
    let mut partial_since: Option<tokio::time::Instant> = None;
    let end = loop {
        // Take every whole frame already received before reading more.
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => {
                last_frame = tokio::time::Instant::now();
                partial_since = None;
                frame
            }
            Ok(None) => {
                if decoder.pending() == 0 {
                    partial_since = None;
                } else if partial_since.is_none() {
                    partial_since = Some(tokio::time::Instant::now());
                }
                let idle_at = last_frame + idle;
                let deadline = partial_since.map_or(idle_at, |since| idle_at.min(since + frame_bound));
                let read = tokio::select! {
                    _ = shutdown.wait() => break End::Reason("callbox is shutting down".into()),
                    _ = keepalive.tick(), if settings.send_silence && guard.is_some() => {
                        match tokio::time::timeout(SILENCE_WRITE_TIMEOUT, stream.write_all(&silence)).await {
                            Ok(Ok(())) => continue,
                            // The PBX closed its end: the same as reading EOF.
                            Ok(Err(e)) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                                break End::Reason("connection closed".into())
                            }
                            Ok(Err(e)) => break End::Fault(format!("write error: {e}")),
                            Err(_) => break End::Fault("the PBX does not read the audio sent back".into()),
                        }
                    }
                    read = tokio::time::timeout_at(deadline, stream.read(&mut buf)) => read,
                };
                match read {
                    Err(_) if deadline < idle_at => {
                        break End::Fault(format!(
                            "a frame begun was not complete within {} ms",
                            frame_bound.as_millis()
                        ))
                    }
                    Err(_) => break End::Fault(format!("no complete frame for {} s", idle.as_secs())),
                    // A reset is how a peer that had unread audio from us closes (RST, not FIN).
                    Ok(Err(e))
                        if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted)
                            && decoder.pending() == 0 =>
                    {
                        break End::Reason("connection closed".into())
                    }
                    Ok(Err(e)) => break End::Fault(format!("read error: {e}")),
                    Ok(Ok(0)) if decoder.pending() > 0 => {
                        break End::Fault(format!(
                            "connection closed in the middle of a frame ({} bytes)",
                            decoder.pending()
                        ))
                    }
                    Ok(Ok(0)) => break End::Reason("connection closed".into()),
                    Ok(Ok(n)) => {
                        decoder.push(&buf[..n]);
                        continue;
                    }
                }
            }
            Err(e) => break End::Fault(format!("malformed frame: {e}")),
        };
        match (frame, &guard) {
            (Frame::Uuid(id), None) => {
                let call = format_uuid(&id);
                match calls.open(&call, leg, &peer.to_string()) {
                    Ok(g) => guard = Some(g),
                    Err(reason) => break End::Refused(format!("call {call} refused: {reason}")),
                }
            }
            (Frame::Uuid(_), Some(_)) => break End::Fault("a second UUID frame on one stream".into()),
            (_, None) => break End::Fault("the first frame was not the call UUID".into()),
            (Frame::Audio { sample_rate, samples }, Some(g)) => {
                g.audio(samples.len() as u64, sample_rate);
                if sample_rate != silence_rate {
                    (silence_rate, silence) = (sample_rate, silence_frame(sample_rate));
                }
                if let Some(reason) = feed_speech(&mut feed, speech.as_ref(), g, sample_rate, samples).await {
                    break End::Fault(reason);
                }
            }
            (Frame::Dtmf(digit), Some(g)) => g.dtmf(digit),
            (Frame::Hangup, Some(_)) => break End::Reason("hangup".into()),
            (Frame::Error(code), Some(_)) => break End::Fault(format!("Asterisk reported error {code:02x?}")),
        }
    };
    // The worker flushes the utterance in progress once its feed is gone.
    drop(feed);
    match end {
        End::Refused(reason) => {
            log::warn!(component = COMPONENT; "{peer}: {reason}");
            // Tell Asterisk to end this AudioSocket rather than stream into the void.
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&encode(&Frame::Hangup))).await;
        }
        End::Reason(reason) => match guard {
            Some(g) => g.close(reason),
            None => log::info!(component = COMPONENT; "{peer}: stream closed before a call was opened: {reason}"),
        },
        End::Fault(reason) => {
            log::warn!(component = COMPONENT; "{peer}: closing {leg:?} stream: {reason}");
            if let Some(g) = guard {
                g.close(reason);
            }
        }
    }
}

/// How often, and how much, silence goes back to the PBX.
const SILENCE_EVERY: Duration = Duration::from_millis(20);
/// A PBX that does not take 20 ms of audio within this is not reading: the stream ends.
const SILENCE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// One encoded frame of 20 ms of silence at `rate`.
fn silence_frame(rate: u32) -> Vec<u8> {
    encode(&Frame::Audio { sample_rate: rate, samples: vec![0; (rate / 50) as usize] })
}

/// Passes a frame's audio to the leg's speech worker, opening it at the first frame.
/// Returns a reason to close the stream (the rate changed mid-stream).
async fn feed_speech(
    feed: &mut Option<(LegFeed, u32)>,
    speech: Option<&(SpeechService, crate::config::SpeechConfig)>,
    guard: &crate::calls::registry::LegGuard,
    sample_rate: u32,
    samples: Vec<i16>,
) -> Option<String> {
    let (service, config) = speech?;
    if feed.is_none() {
        // This frame's audio began a frame's length ago.
        let offset = guard.secs_into_call() - samples.len() as f64 / f64::from(sample_rate.max(1));
        match service.open_leg(guard.call(), guard.leg(), sample_rate, offset, config) {
            Ok(f) => *feed = Some((f, sample_rate)),
            Err(e) => {
                log::error!(component = COMPONENT, call_id = guard.call(); "no speech for this leg: {e}");
                return None;
            }
        }
    }
    match feed.as_ref() {
        Some((_, rate)) if *rate != sample_rate => {
            Some(format!("audio rate changed from {rate} Hz to {sample_rate} Hz within one stream"))
        }
        // Waits while the worker is a full queue behind: TCP back-pressure to the PBX.
        // A worker that stopped (it logged why) refuses at once; the call goes on.
        Some((f, _)) => {
            f.push(samples).await;
            None
        }
        None => None,
    }
}
