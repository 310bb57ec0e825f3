//! AudioSocket streams from a stand-in PBX over real TCP into the daemon.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{wait_until, TestDaemon};

const WAIT: Duration = Duration::from_secs(20);
const CALL: [u8; 16] = [0xa1, 0xb2, 0xc3, 0xd4, 0, 1, 0x40, 2, 0x80, 3, 0, 0, 0, 0, 0, 0x42];
const CALL_TEXT: &str = "a1b2c3d4-0001-4002-8003-000000000042";

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// 20 ms of 8 kHz audio, as Asterisk sends it.
fn audio_frame() -> Vec<u8> {
    let samples: Vec<u8> = (0..160i16).flat_map(|i| (i * 50).to_le_bytes()).collect();
    frame(0x10, &samples)
}

fn uuid_frame(id: &[u8; 16]) -> Vec<u8> {
    frame(0x01, id)
}

/// Starts a daemon with a customer and an agent listener on free ports. Speech is off:
/// these tests are about the protocol (tests/speech.rs streams real speech).
fn daemon(extra: &str) -> (TestDaemon, String, String) {
    daemon_in(tempfile::tempdir().unwrap(), extra)
}

/// The same in a prepared directory (its data directory may hold files already).
fn daemon_in(dir: tempfile::TempDir, extra: &str) -> (TestDaemon, String, String) {
    let settings = format!(
        "speech.enabled = false\naudiosocket.listeners = [{{ address = \"127.0.0.1:0\", leg = \"customer\" }}, {{ address = \"127.0.0.1:0\", leg = \"agent\" }}]\n{extra}"
    );
    let d = TestDaemon::start_in(dir, &settings, &[]);
    let status = d.status_json();
    let listeners: Vec<String> =
        status["audiosocket_listeners"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect();
    let addr = |leg: &str| {
        listeners.iter().find(|l| l.ends_with(&format!("({leg})"))).unwrap().split(' ').next().unwrap().to_owned()
    };
    let (customer, agent) = (addr("customer"), addr("agent"));
    (d, customer, agent)
}

fn active_calls(d: &TestDaemon) -> Vec<serde_json::Value> {
    d.status_json()["calls"]["active"].as_array().unwrap().clone()
}

fn leg_of<'a>(call: &'a serde_json::Value, leg: &str) -> &'a serde_json::Value {
    call["legs"].as_array().unwrap().iter().find(|l| l["leg"] == leg).unwrap()
}

/// Whether the daemon closed the connection (EOF) within the wait.
fn closed_by_daemon(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

#[test]
fn two_legs_pair_into_a_call_with_frames_split_and_batched() {
    let (d, customer_addr, agent_addr) = daemon("");
    let mut customer = TcpStream::connect(&customer_addr).unwrap();
    // UUID and one second of audio, written in awkward pieces: a frame split
    // across writes and many frames in one write.
    let mut bytes = uuid_frame(&CALL);
    for _ in 0..50 {
        bytes.extend(audio_frame());
    }
    bytes.extend(frame(0x03, b"5"));
    for piece in bytes.chunks(333) {
        customer.write_all(piece).unwrap();
        customer.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut agent = TcpStream::connect(&agent_addr).unwrap();
    agent.write_all(&uuid_frame(&CALL)).unwrap();
    agent.write_all(&[audio_frame(), audio_frame()].concat()).unwrap();

    assert!(
        wait_until(WAIT, || {
            let calls = active_calls(&d);
            calls.len() == 1
                && calls[0]["legs"].as_array().unwrap().len() == 2
                && leg_of(&calls[0], "customer")["audio_ms"] == 1000
        }),
        "{:#}",
        d.status_json()["calls"]
    );
    let call = &active_calls(&d)[0];
    assert_eq!(call["call"], CALL_TEXT);
    assert_eq!(leg_of(call, "customer")["dtmf"], "5");
    assert_eq!(leg_of(call, "agent")["audio_ms"], 40);

    // Hangup from the customer side, the agent simply disconnects: the call ends.
    customer.write_all(&frame(0x00, &[])).unwrap();
    drop(agent);
    assert!(wait_until(WAIT, || active_calls(&d).is_empty()));
    let calls = &d.status_json()["calls"];
    assert_eq!(calls["total_started"], 1);
    let log = d.log_text();
    assert!(
        log.contains("Customer leg closed: hangup") && log.contains("Agent leg closed: connection closed"),
        "{log}"
    );
    assert!(log.contains("call ended (agent 40 ms, customer 1000 ms)"), "{log}");
}

#[test]
fn malformed_streams_are_closed_with_a_reason_and_harm_no_other_call() {
    let (d, customer_addr, _) = daemon("audiosocket.max_frame_bytes = 640");
    let mut healthy = TcpStream::connect(&customer_addr).unwrap();
    healthy.write_all(&[uuid_frame(&CALL), audio_frame()].concat()).unwrap();

    let mut other = [0u8; 16];
    for (i, (bad, reason)) in [
        (frame(0x42, b"??"), "unknown frame kind 0x42"),
        (vec![0x10, 0x10, 0x00], "declares 4096 bytes; the limit is 640"),
        (frame(0x10, &[1, 2, 3]), "odd byte count"),
    ]
    .into_iter()
    .enumerate()
    {
        other[15] = i as u8;
        let mut s = TcpStream::connect(&customer_addr).unwrap();
        s.write_all(&[uuid_frame(&other), bad].concat()).unwrap();
        closed_by_daemon(&mut s);
        assert!(wait_until(WAIT, || d.log_text().contains(reason)), "no '{reason}' in log:\n{}", d.log_text());
    }
    // Audio before the UUID, and an abrupt close in the middle of a frame.
    let mut s = TcpStream::connect(&customer_addr).unwrap();
    s.write_all(&audio_frame()).unwrap();
    closed_by_daemon(&mut s);
    let mut s = TcpStream::connect(&customer_addr).unwrap();
    other[15] = 9;
    s.write_all(&[uuid_frame(&other), audio_frame()[..100].to_vec()].concat()).unwrap();
    // A FIN, not a reset: dropping a socket with the daemon's keep-alive silence unread in
    // it makes the kernel send RST (seen under qemu, where the keep-alive came first), and
    // the daemon then rightly reports a reset instead of the half frame.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    closed_by_daemon(&mut s);
    assert!(
        wait_until(WAIT, || {
            let log = d.log_text();
            log.contains("the first frame was not the call UUID")
                && log.contains("closed in the middle of a frame (100 bytes)")
        }),
        "{}",
        d.log_text()
    );

    // The healthy stream is still going.
    healthy.write_all(&audio_frame()).unwrap();
    assert!(
        wait_until(WAIT, || {
            let calls = active_calls(&d);
            calls.len() == 1 && calls[0]["call"] == CALL_TEXT && leg_of(&calls[0], "customer")["audio_ms"] == 40
        }),
        "{:#}",
        d.status_json()["calls"]
    );
    assert_eq!(d.status_json()["state"], "running");
}

/// Opens a leg of another call than `CALL`; what the daemon sent back before closing.
fn open_a_second_call(address: &str) -> Vec<u8> {
    let mut second = TcpStream::connect(address).unwrap();
    let mut id = CALL;
    id[0] = 0xff;
    second.write_all(&uuid_frame(&id)).unwrap();
    closed_by_daemon(&mut second)
}

#[test]
fn admission_control_hangs_up_calls_beyond_capacity() {
    let (d, customer_addr, agent_addr) = daemon("calls.max_concurrent = 1");
    let mut first = TcpStream::connect(&customer_addr).unwrap();
    first.write_all(&uuid_frame(&CALL)).unwrap();
    assert!(wait_until(WAIT, || active_calls(&d).len() == 1));
    // The other leg of the admitted call is welcome...
    let mut agent = TcpStream::connect(&agent_addr).unwrap();
    agent.write_all(&uuid_frame(&CALL)).unwrap();
    // ...a second call is not: the daemon answers with a hangup frame and closes.
    assert_eq!(open_a_second_call(&customer_addr), vec![0, 0, 0]);
    assert!(wait_until(WAIT, || d.status_json()["calls"]["total_refused"] == 1));
    let calls = active_calls(&d);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["legs"].as_array().unwrap().len(), 2);
    drop(first);
    drop(agent);
}

/// A rating as `callbox bench capacity --save` writes it, for a box with `cores` cores.
fn rating(rated_calls: usize, cores: usize) -> String {
    serde_json::json!({
        "rated_calls": rated_calls, "budget_secs": 1.5, "measured_at_unix_ms": 1_796_256_000_000u64,
        "daemon_version": "0.1.0", "cores": cores, "cpu": "test", "models_version": "-",
        "asr_workers": cores, "asr_batch": callbox::config::DEFAULT_ASR_BATCH, "load": "test", "steps": [],
    })
    .to_string()
}

#[test]
fn admission_holds_to_the_rated_capacity_and_a_reload_rereads_it() {
    use std::os::unix::fs::DirBuilderExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::DirBuilder::new().mode(0o700).create(&data).unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    std::fs::write(data.join("capacity.json"), rating(1, cores)).unwrap();
    // No models here: the box's models version is "-", as in the rating.
    let (d, customer_addr, _) = daemon_in(dir, "speech.models_dir = \"/nonexistent/models\"");
    let calls = d.status_json()["calls"].clone();
    assert_eq!(calls["max_calls"], 1, "{calls:#}");
    assert_eq!(calls["limit_source"], "the box's rated capacity, `callbox bench capacity` of 2026-12-03");

    let mut first = TcpStream::connect(&customer_addr).unwrap();
    first.write_all(&uuid_frame(&CALL)).unwrap();
    assert!(wait_until(WAIT, || active_calls(&d).len() == 1));
    assert_eq!(open_a_second_call(&customer_addr), vec![0, 0, 0]);
    assert!(wait_until(WAIT, || d.status_json()["calls"]["refused_at_capacity"] == 1));
    assert!(d.log_text().contains("at capacity: 1 concurrent calls (the box's rated capacity"), "{}", d.log_text());
    let text = String::from_utf8(d.cli(&["status"]).stdout).unwrap();
    assert!(text.contains("1 active of at most 1 (the box's rated capacity"), "{text}");

    // Rated on another box (more cores): set aside on reload, with a warning to act on.
    std::fs::write(d.dir.path().join("data/capacity.json"), rating(1, cores + 1)).unwrap();
    assert!(d.cli(&["reload"]).status.success());
    let calls = d.status_json()["calls"].clone();
    assert_eq!((calls["max_calls"].as_u64(), calls["limit_source"].as_str()), (Some(32), Some("calls.max_concurrent")));
    let warning = calls["limit_warning"].as_str().unwrap();
    assert!(warning.contains(&format!("{} cores then, {cores} now", cores + 1)), "{warning}");
    // The call already taken was never touched.
    assert_eq!(active_calls(&d).len(), 1);
    drop(first);
}

#[test]
fn silent_streams_time_out_and_unknown_peers_are_refused() {
    let (d, customer_addr, _) = daemon("audiosocket.idle_timeout_secs = 1");
    let mut silent = TcpStream::connect(&customer_addr).unwrap();
    silent.write_all(&uuid_frame(&CALL)).unwrap();
    assert!(wait_until(WAIT, || active_calls(&d).len() == 1));
    closed_by_daemon(&mut silent);
    assert!(wait_until(WAIT, || active_calls(&d).is_empty()));
    assert!(d.log_text().contains("no complete frame for 1 s"));

    let (d, customer_addr, _) = daemon("audiosocket.allowed_peers = [\"192.0.2.10\"]");
    let mut stranger = TcpStream::connect(&customer_addr).unwrap();
    let _ = stranger.write_all(&uuid_frame(&CALL));
    closed_by_daemon(&mut stranger);
    assert!(wait_until(WAIT, || d.log_text().contains("not in audiosocket.allowed_peers")));
    assert!(active_calls(&d).is_empty());
}

#[test]
fn a_taken_port_fails_the_start_with_exit_71() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let settings = format!("audiosocket.listeners = [{{ address = \"127.0.0.1:{port}\", leg = \"customer\" }}]");
    std::fs::write(&config, TestDaemon::config_text(dir.path(), &settings)).unwrap();
    let log = dir.path().join("log");
    let mut child = TestDaemon::spawn(&config, &log, &[]);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(71));
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains(&format!("cannot listen for AudioSocket on 127.0.0.1:{port}")));
}

#[test]
fn an_admitted_leg_gets_silence_back_at_the_pbx_rate() {
    let (d, customer_addr, _) = daemon("audiosocket.idle_timeout_secs = 1");
    let mut s = TcpStream::connect(&customer_addr).unwrap();
    s.write_all(&uuid_frame(&CALL)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut header = [0u8; 3];
    s.read_exact(&mut header).unwrap();
    // 20 ms of 8 kHz signed linear: kind 0x10, 320 bytes of zeros.
    assert_eq!(header, [0x10, 0x01, 0x40]);
    let mut payload = vec![1u8; 320];
    s.read_exact(&mut payload).unwrap();
    assert!(payload.iter().all(|&b| b == 0));
    // Keep-alive frames keep coming while the PBX sends nothing; and reading them does not
    // stop the idle timeout (1 s here) from closing a leg that never sends audio.
    let started = std::time::Instant::now();
    let mut more = Vec::new();
    let _ = s.read_to_end(&mut more);
    assert!(more.len() >= 20 * 323, "{} bytes of keep-alive in {:?}", more.len(), started.elapsed());
    assert!(wait_until(WAIT, || d.log_text().contains("no complete frame for 1 s")), "{}", d.log_text());
    drop(d);

    // At 16 kHz (kind 0x12) after the PBX's first 16-kHz frame.
    let (d, customer_addr, _) = daemon("audiosocket.idle_timeout_secs = 5");
    let mut s = TcpStream::connect(&customer_addr).unwrap();
    let mut id = CALL;
    id[15] = 0x43;
    s.write_all(&[uuid_frame(&id), frame(0x12, &[0u8; 640])].concat()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let saw_16k = wait_until(WAIT, || {
        let mut header = [0u8; 3];
        s.read_exact(&mut header).unwrap();
        let len = u16::from_be_bytes([header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        header[0] == 0x12 && len == 640
    });
    assert!(saw_16k);
    drop(d);
}

/// A TCP connection to `addr` from the loopback address `from` (any 127.0.0.0/8 works).
fn connect_from(from: std::net::Ipv4Addr, addr: &str) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let to: std::net::SocketAddrV4 = addr.parse().unwrap();
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns; the addresses are
    // valid sockaddr_in values that live across the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(from, 0);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(*to.ip(), to.port());
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

#[test]
fn a_slowloris_host_cannot_keep_a_real_call_out() {
    let (d, customer_addr, _) = daemon("");
    // 600 connections from one host, each dribbling a frame one byte every 500 ms: the old
    // daemon restarted its idle timer on every byte and shared 512 slots between
    // listeners, so a real call waited as long as the dribbling went on.
    let mut attackers: Vec<TcpStream> =
        (0..600).filter_map(|_| connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), &customer_addr).ok()).collect();
    assert!(attackers.len() >= 500, "only {} attacker connections", attackers.len());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dribbling = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let frame = audio_frame();
            for byte in frame.iter().take(20) {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                for a in &mut attackers {
                    let _ = a.set_nonblocking(true);
                    let _ = a.write_all(&[*byte]);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            attackers
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    // The PBX's real call, from another address, while the flood goes on.
    let mut real = TcpStream::connect(&customer_addr).unwrap();
    real.write_all(&uuid_frame(&CALL)).unwrap();
    real.write_all(&audio_frame()).unwrap();
    let served = wait_until(Duration::from_secs(5), || active_calls(&d).len() == 1);
    // The dribbling streams are closed once their frame overruns its bound.
    let cut = wait_until(WAIT, || d.log_text().contains("a frame begun was not complete within 2000 ms"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attackers = dribbling.join().unwrap();
    assert!(served, "the real call was kept out; log:\n{}", d.log_text());
    assert!(cut, "{}", d.log_text());
    let log = d.log_text();
    assert_eq!(log.matches("127.0.0.2 holds 64 AudioSocket streams").count(), 1, "said once: {log}");
    drop(attackers);
    drop(real);
}
