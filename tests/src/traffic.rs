//! Traffic for the end-to-end tests: a small HTTP/1.1 server whose response delay the test
//! controls, a client that opens many flows and remembers what it sent on each, and a VXLAN sink
//! that decodes mirror copies back into per-flow client byte counts.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

/// A keep-alive HTTP/1.1 server on a thread. `GET /delay/<ms>…` answers after `<ms>`
/// milliseconds; everything else at once. Responses are `200 OK` with a short body.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Starts serving on an already bound listener (bind it inside the right host).
    pub fn start(listener: TcpListener) -> Self {
        Self::start_with_delay(listener, Duration::ZERO)
    }

    /// Like [`HttpServer::start`], but every response waits `delay` first: a slow shadow.
    pub fn start_with_delay(listener: TcpListener, delay: Duration) -> Self {
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        thread::spawn(move || serve(conn, delay));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, delay: Duration) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        if let Some(ms) = path
            .strip_prefix("/delay/")
            .and_then(|r| r.split('/').next()?.parse().ok())
        {
            thread::sleep(Duration::from_millis(ms));
        }
        thread::sleep(delay);
        let body = b"doppel ok\n";
        let response =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        if conn
            .write_all(&[response.as_slice(), body].concat())
            .is_err()
        {
            return;
        }
    }
}

/// Opens one TCP flow, sends each request in turn (reading the response to each), closes it.
/// Returns the client port and the request bytes sent.
pub fn http_flow(server: SocketAddr, requests: &[String]) -> (u16, u64) {
    let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let port = conn.local_addr().expect("local").port();
    let mut sent = 0;
    for request in requests {
        conn.write_all(request.as_bytes()).expect("send request");
        sent += request.len() as u64;
        read_response(&mut conn);
    }
    (port, sent)
}

fn read_response(conn: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).expect("read response");
        assert!(n > 0, "server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return;
            }
        }
    }
}

/// What a shadow host received for one mirrored flow.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MirroredFlow {
    /// Client payload bytes (distinct sequence ranges, so retransmits do not count twice).
    pub payload_bytes: u64,
    /// Packets received.
    pub packets: u64,
    /// A FIN or RST was mirrored.
    pub closed: bool,
    /// Packets with no payload and no FIN or RST (the data path copies those only as a
    /// keepalive, after 10 s without a copy).
    pub bare_acks: u64,
}

/// Key of a mirrored flow at a sink: (VNI, client port).
pub type SinkKey = (u32, u16);

/// A UDP socket on port 4789 decoding VXLAN mirror copies into per-flow byte counts.
#[derive(Debug)]
pub struct VxlanSink {
    flows: Arc<Mutex<HashMap<SinkKey, MirroredFlow>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VxlanSink {
    /// Starts decoding from a bound socket (bind it inside the shadow host).
    pub fn start(socket: UdpSocket) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let flows: Arc<Mutex<HashMap<SinkKey, MirroredFlow>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (Arc::clone(&flows), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut seen: HashMap<SinkKey, std::collections::HashSet<(u32, u32)>> = HashMap::new();
            let mut buf = [0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                if let Some((key, seq, len, fin_or_rst)) = decode(&buf[..n]) {
                    let mut flows = f.lock().expect("lock");
                    let flow = flows.entry(key).or_default();
                    flow.packets += 1;
                    flow.closed |= fin_or_rst;
                    flow.bare_acks += u64::from(len == 0 && !fin_or_rst);
                    let ranges = seen.entry(key).or_default();
                    if len > 0 && ranges.insert((seq, len)) {
                        flow.payload_bytes += u64::from(len);
                    }
                }
            }
        });
        Self {
            flows,
            stop,
            thread: Some(thread),
        }
    }

    /// What arrived so far.
    pub fn flows(&self) -> HashMap<SinkKey, MirroredFlow> {
        self.flows.lock().expect("lock").clone()
    }
}

impl Drop for VxlanSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// VXLAN -> Ethernet -> IPv4/IPv6 -> TCP: (vni, client port), seq, payload length, FIN|RST.
fn decode(packet: &[u8]) -> Option<(SinkKey, u32, u32, bool)> {
    if packet.len() < 8 || packet[0] & 0x08 == 0 {
        return None;
    }
    let vni = u32::from_be_bytes([0, packet[4], packet[5], packet[6]]);
    let frame = &packet[8..];
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (tcp, ip_payload_len) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            (ip.get(ihl..total)?, total - ihl)
        }
        0x86dd => {
            let len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            (ip.get(40..40 + len)?, len)
        }
        _ => return None,
    };
    let client_port = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let seq = u32::from_be_bytes([*tcp.get(4)?, *tcp.get(5)?, *tcp.get(6)?, *tcp.get(7)?]);
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    let payload = ip_payload_len.checked_sub(doff)? as u32;
    Some(((vni, client_port), seq, payload, flags & 0x05 != 0))
}

/// Sends raw Ethernet frames out of `iface` from the calling thread's network namespace
/// (AF_PACKET), for tests that need packets no socket API would build: IP options, fragments,
/// VLAN tags, truncated headers.
pub fn send_raw_frames(iface: &str, frames: &[Vec<u8>]) {
    let ifindex = nix::net::if_::if_nametoindex(iface).expect("ifindex");
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: all-zero is a valid sockaddr_ll; the fields set below complete it.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    for frame in frames {
        // SAFETY: `frame` and `addr` outlive the call; lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
}

/// The IPv4 header checksum (RFC 791) of `header`.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying an IPv4 packet: `options` (a multiple of 4 bytes) after the
/// 20-byte header, `fragment` = (more fragments, offset in 8-byte units).
pub fn ipv4_frame(
    macs: ([u8; 6], [u8; 6]),
    addrs: (std::net::Ipv4Addr, std::net::Ipv4Addr),
    protocol: u8,
    options: &[u8],
    fragment: (bool, u16),
    payload: &[u8],
) -> Vec<u8> {
    let header_len = 20 + options.len();
    let mut ip = vec![0u8; header_len];
    ip[0] = 0x40 | (header_len / 4) as u8;
    ip[2..4].copy_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    let frag = (u16::from(fragment.0) << 13) | fragment.1;
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&addrs.0.octets());
    ip[16..20].copy_from_slice(&addrs.1.octets());
    ip[20..].copy_from_slice(options);
    let checksum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&macs.1);
    frame.extend_from_slice(&macs.0);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend(ip);
    frame.extend_from_slice(payload);
    frame
}

/// A UDP header (checksum 0: "none", allowed over IPv4) followed by `data`.
pub fn udp_datagram(src_port: u16, dst_port: u16, data: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&src_port.to_be_bytes());
    udp.extend_from_slice(&dst_port.to_be_bytes());
    udp.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(data);
    udp
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

/// A UDP socket that receives and discards, counting packets and bytes: a shadow endpoint for
/// benchmarks, where decoding every copy would cost more than the thing measured.
#[derive(Debug)]
pub struct UdpDrain {
    received: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpDrain {
    /// Starts draining a bound socket.
    pub fn start(socket: UdpSocket) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (Arc::clone(&received), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    r.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Packets received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpDrain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
