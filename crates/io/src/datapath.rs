//! The batched data path between the UDP socket, the core and the TUN device.
//!
//! Network → TUN: one `recvmmsg` (quinn-udp, with UDP GRO: one buffer may hold many
//! datagrams of one sender) fills up to [`quinn_udp::BATCH_SIZE`] buffers; each datagram
//! goes through the core into its own TUN buffer; the batch is written with tun-rs's
//! `send_multiple`, which coalesces TCP/UDP segments of one flow (GRO) into a single
//! virtio-net write when offloads are on.
//!
//! TUN → network: one read with offloads on can return a 64 KiB TCP super-packet; tun-rs
//! splits it into MTU-sized segments; each goes through the core and is encrypted
//! directly into a contiguous send buffer; runs of equal-sized datagrams to one peer leave
//! in one `sendmsg` with UDP GSO.
//!
//! Why: at ~1 µs of our own work per packet, the kernel's per-packet cost (syscalls,
//! forwarding each TUN write) dominated (measured: 85% of the gateway's CPU was system
//! time). Batching moves that cost from per packet to per batch.

use std::io::{ErrorKind, IoSliceMut};
use std::net::SocketAddr;
use std::time::Instant;

use portcullis_control::DatapathStats;
use portcullis_core::{Gateway, MAX_PACKET};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

/// Room in front of each TUN packet for the virtio-net header.
const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;
/// Largest UDP read with GRO (many coalesced datagrams).
const RX_BUF: usize = 65_535;
/// Size of a WireGuard handshake initiation, the largest non-data message.
const HANDSHAKE_INIT_LEN: usize = 148;
/// Segments one TUN read can split into (64 KiB / MTU, with room).
const TUN_SEGMENTS: usize = 128;
/// Datagrams per GSO send (the kernel's UDP_MAX_SEGMENTS is 64 or more).
const MAX_GSO_SEGMENTS: usize = 64;
/// Bytes per GSO send: the whole batch is one UDP datagram to the kernel, so it must fit
/// the 64 KiB IP length (larger sends fail with EMSGSIZE and would be lost).
const MAX_GSO_BYTES: usize = 65_000;

/// Buffers and state of the data path; allocated once.
pub struct Datapath {
    pub udp: UdpSocket,
    udp_state: UdpSocketState,
    pub tun: AsyncDevice,
    offload: bool,
    rx_bufs: Vec<Vec<u8>>,
    rx_meta: Vec<RecvMeta>,
    tun_out: Vec<Vec<u8>>,
    gro: GROTable,
    tun_raw: Vec<u8>,
    tun_segs: Vec<Vec<u8>>,
    tun_sizes: Vec<usize>,
    gso_buf: Vec<u8>,
    max_gso_segments: usize,
    pub stats: DatapathStats,
}

impl Datapath {
    pub fn new(udp: UdpSocket, tun: AsyncDevice, offload: bool) -> std::io::Result<Datapath> {
        let udp_state = UdpSocketState::new((&udp).into())?;
        restore_default_pmtu(&udp);
        let batch = quinn_udp::BATCH_SIZE;
        let max_gso = udp_state.max_gso_segments().max(1);
        Ok(Datapath {
            udp,
            udp_state,
            tun,
            offload,
            rx_bufs: (0..batch).map(|_| vec![0u8; RX_BUF]).collect(),
            rx_meta: vec![RecvMeta::default(); batch],
            tun_out: Vec::new(),
            gro: GROTable::default(),
            tun_raw: vec![0u8; TUN_OFFSET + 65_535],
            tun_segs: (0..TUN_SEGMENTS).map(|_| vec![0u8; MAX_PACKET]).collect(),
            tun_sizes: vec![0; TUN_SEGMENTS],
            gso_buf: vec![0u8; TUN_SEGMENTS * (MAX_PACKET + 64)],
            max_gso_segments: max_gso.min(MAX_GSO_SEGMENTS),
            stats: DatapathStats::default(),
        })
    }

    /// Drains what the UDP socket has (bounded), through the core, to the TUN device.
    pub async fn on_udp_readable(&mut self, gw: &mut Gateway) -> std::io::Result<()> {
        let mut used = 0usize;
        for _ in 0..4 {
            let n = {
                let mut iovs: Vec<IoSliceMut<'_>> = self
                    .rx_bufs
                    .iter_mut()
                    .map(|b| IoSliceMut::new(b))
                    .collect();
                let (udp, state, meta) = (&self.udp, &self.udp_state, &mut self.rx_meta);
                let r = udp.try_io(Interest::READABLE, || {
                    state.recv(udp.into(), &mut iovs, meta)
                });
                match ready(r, "udp receive") {
                    Some(n) => n,
                    None => break,
                }
            };
            self.stats.udp_batches += 1;
            let now = Instant::now();
            for (meta, buf) in self.rx_meta.iter().zip(&self.rx_bufs).take(n) {
                let stride = meta.stride.max(1);
                let data = buf.get(..meta.len).unwrap_or_default();
                for datagram in data.chunks(stride) {
                    self.stats.udp_datagrams += 1;
                    if self.tun_out.len() <= used {
                        self.tun_out.push(vec![0u8; TUN_OFFSET + MAX_PACKET]);
                    }
                    let Some(out) = self.tun_out.get_mut(used) else {
                        continue;
                    };
                    // Room for the plaintext: never longer than the datagram (a handshake
                    // answer needs up to 92 bytes of a 148-byte initiation). Growing only
                    // to that avoids zero-filling a jumbo-sized buffer per packet.
                    out.resize(TUN_OFFSET + datagram.len().max(HANDSHAKE_INIT_LEN), 0);
                    let Some(space) = out.get_mut(TUN_OFFSET..) else {
                        continue;
                    };
                    if let Some(packet) = gw.handle_datagram(now, meta.addr, datagram, space) {
                        let len = packet.len();
                        out.truncate(TUN_OFFSET + len);
                        used += 1;
                    }
                }
            }
            if used >= 64 {
                self.flush_tun(used).await;
                used = 0;
            }
        }
        self.flush_tun(used).await;
        Ok(())
    }

    async fn flush_tun(&mut self, used: usize) {
        if used == 0 {
            return;
        }
        self.stats.tun_writes += 1;
        let Some(bufs) = self.tun_out.get_mut(..used) else {
            return;
        };
        if self.offload {
            if let Err(e) = self
                .tun
                .send_multiple(&mut self.gro, bufs, TUN_OFFSET)
                .await
            {
                tracing::debug!("tun write: {e}");
            }
        } else {
            for b in bufs.iter() {
                if let Err(e) = self.tun.send(b.get(TUN_OFFSET..).unwrap_or_default()).await {
                    tracing::debug!("tun write: {e}");
                }
            }
        }
    }

    /// Writes one packet the core produced (injected resets) to the TUN device.
    pub async fn write_tun_packet(&mut self, packet: &[u8]) {
        let mut buf = vec![0u8; TUN_OFFSET];
        buf.extend_from_slice(packet);
        if self.tun_out.is_empty() {
            self.tun_out.push(Vec::new());
        }
        if let Some(slot) = self.tun_out.get_mut(0) {
            *slot = buf;
        }
        self.flush_tun(1).await;
    }

    /// Drains what the TUN device has (bounded), through the core, to the UDP socket.
    pub async fn on_tun_readable(&mut self, gw: &mut Gateway) -> std::io::Result<()> {
        for _ in 0..16 {
            let r = if self.offload {
                self.tun.try_recv_multiple(
                    &mut self.tun_raw,
                    &mut self.tun_segs,
                    &mut self.tun_sizes,
                    0,
                )
            } else {
                let Some(seg) = self.tun_segs.get_mut(0) else {
                    break;
                };
                self.tun.try_recv(seg).map(|len| {
                    if let Some(s) = self.tun_sizes.get_mut(0) {
                        *s = len;
                    }
                    1
                })
            };
            let Some(n) = ready(r, "tun receive") else {
                break;
            };
            self.stats.tun_reads += 1;
            let now = Instant::now();
            // Encrypt into one contiguous buffer; runs to one peer with one size go out
            // as a single GSO send.
            let mut runs = RunBuilder::new(self.max_gso_segments);
            let mut pos = 0usize;
            for i in 0..n {
                let (Some(seg), Some(&size)) = (self.tun_segs.get(i), self.tun_sizes.get(i)) else {
                    continue;
                };
                let Some(packet) = seg.get(..size) else {
                    continue;
                };
                if pos + MAX_PACKET + 64 > self.gso_buf.len() {
                    if let Some(r) = runs.finish() {
                        send_run(
                            &self.udp,
                            &self.udp_state,
                            &mut self.stats,
                            &self.gso_buf,
                            r,
                        )
                        .await;
                    }
                    pos = 0;
                }
                let Some(space) = self.gso_buf.get_mut(pos..pos + MAX_PACKET + 64) else {
                    continue;
                };
                let Some((dst, datagram)) = gw.handle_tun_packet(now, packet, space) else {
                    continue;
                };
                let len = datagram.len();
                if let Some(r) = runs.push(dst, pos, len) {
                    send_run(
                        &self.udp,
                        &self.udp_state,
                        &mut self.stats,
                        &self.gso_buf,
                        r,
                    )
                    .await;
                }
                pos += len;
            }
            if let Some(r) = runs.finish() {
                send_run(
                    &self.udp,
                    &self.udp_state,
                    &mut self.stats,
                    &self.gso_buf,
                    r,
                )
                .await;
            }
        }
        Ok(())
    }

    /// Sends one datagram the core produced (handshakes, keepalives, cookies).
    pub async fn send_datagram(&mut self, dst: SocketAddr, datagram: &[u8]) {
        send_datagrams(
            &self.udp,
            &self.udp_state,
            &mut self.stats,
            dst,
            datagram.len(),
            datagram,
        )
        .await;
    }
}

/// quinn-udp puts the socket in `IP_PMTUDISC_PROBE` mode (DF set, learned path MTU
/// ignored), right for QUIC's own path-MTU probing but not for a tunnel: an outer packet
/// larger than the real path would be dropped on the way. Restore Linux's default
/// (`IP_PMTUDISC_WANT`: follow the learned path MTU and fragment locally when needed), as
/// other WireGuard implementations get. Failure only logs: the socket still works.
fn restore_default_pmtu(udp: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = udp.as_raw_fd();
    for (level, name, value) in [
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_WANT,
        ),
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        ),
    ] {
        if let Err(e) = set_int_option(fd, level, name, value) {
            // The IPv6 option fails on IPv4-only sockets; that is expected.
            tracing::debug!(level, name, "restoring path-MTU discovery mode: {e}");
        }
    }
}

/// `setsockopt` for an int option; neither nix nor socket2 offers these two.
#[allow(unsafe_code)]
fn set_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: `fd` is an open socket owned by the caller for the duration of the call;
    // the option value is a plain int whose size we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads an int socket option (tests).
#[cfg(test)]
#[allow(unsafe_code)]
fn get_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers to a local int and its length, for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A non-blocking read's result: `None` ends the drain loop (nothing pending, or an error,
/// logged; the next readiness event retries).
fn ready(r: std::io::Result<usize>, what: &str) -> Option<usize> {
    match r {
        Ok(n) => Some(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => {
            tracing::debug!("{what}: {e}");
            None
        }
    }
}

/// Consecutive encrypted datagrams in the send buffer, for one GSO send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    dst: SocketAddr,
    segment: usize,
    start: usize,
    end: usize,
    count: usize,
    /// Ended by a shorter datagram: nothing may follow it in this send.
    closed: bool,
}

/// Groups datagrams written back to back into GSO sends: same peer, same size (the last
/// may be shorter), at most `max_segments` and [`MAX_GSO_BYTES`] per send.
#[derive(Debug)]
struct RunBuilder {
    current: Option<Run>,
    max_segments: usize,
}

impl RunBuilder {
    fn new(max_segments: usize) -> Self {
        RunBuilder {
            current: None,
            max_segments: max_segments.max(1),
        }
    }

    /// Adds the datagram at `start..start + len`; returns a finished run to send first.
    fn push(&mut self, dst: SocketAddr, start: usize, len: usize) -> Option<Run> {
        if let Some(r) = self.current.as_mut() {
            let fits = r.dst == dst
                && !r.closed
                && r.end == start
                && len <= r.segment
                && r.count < self.max_segments
                && r.end + len - r.start <= MAX_GSO_BYTES;
            if fits {
                r.count += 1;
                r.end += len;
                r.closed = len < r.segment;
                return None;
            }
        }
        self.current.replace(Run {
            dst,
            segment: len,
            start,
            end: start + len,
            count: 1,
            closed: false,
        })
    }

    fn finish(&mut self) -> Option<Run> {
        self.current.take()
    }
}

async fn send_run(
    udp: &UdpSocket,
    state: &UdpSocketState,
    stats: &mut DatapathStats,
    buf: &[u8],
    run: Run,
) {
    let contents = buf.get(run.start..run.end).unwrap_or_default();
    send_datagrams(udp, state, stats, run.dst, run.segment, contents).await;
}

/// Sends `contents` (datagrams of `segment` bytes, the last possibly shorter) to `dst`.
async fn send_datagrams(
    udp: &UdpSocket,
    state: &UdpSocketState,
    stats: &mut DatapathStats,
    dst: SocketAddr,
    segment: usize,
    contents: &[u8],
) {
    if contents.is_empty() {
        return;
    }
    let transmit = Transmit {
        destination: dst,
        ecn: None,
        contents,
        segment_size: (contents.len() > segment).then_some(segment),
        src_ip: None,
    };
    stats.udp_sends += 1;
    if let Err(e) = udp
        .async_io(Interest::WRITABLE, || state.try_send(udp.into(), &transmit))
        .await
    {
        stats.send_errors += 1;
        // Rare and costly (a whole batch): visible at the default level, but not per packet.
        if stats.send_errors.is_power_of_two() {
            tracing::warn!(errors = stats.send_errors, "udp send to {dst} failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(max_segments: usize, datagrams: &[(u16, usize)]) -> Vec<Run> {
        let mut b = RunBuilder::new(max_segments);
        let mut pos = 0;
        let mut out = Vec::new();
        for &(port, len) in datagrams {
            out.extend(b.push(SocketAddr::from(([192, 168, 1, 2], port)), pos, len));
            pos += len;
        }
        out.extend(b.finish());
        out
    }

    #[test]
    fn the_socket_follows_the_learned_path_mtu_after_quinn_udp_setup() -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let udp = UdpSocket::bind("127.0.0.1:0").await?;
            let _state = UdpSocketState::new((&udp).into())?;
            let fd = udp.as_raw_fd();
            assert_eq!(
                get_int_option(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)?,
                libc::IP_PMTUDISC_PROBE
            );
            restore_default_pmtu(&udp);
            assert_eq!(
                get_int_option(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)?,
                libc::IP_PMTUDISC_WANT
            );
            Ok(())
        })
    }

    #[test]
    fn runs_never_exceed_the_64k_gso_limit_and_cover_every_datagram() {
        let runs = plan(64, &[(1, 1452); 100]);
        assert!(
            runs.iter()
                .all(|r| r.end - r.start <= MAX_GSO_BYTES && r.count <= 64),
            "{runs:?}"
        );
        assert_eq!(runs.iter().map(|r| r.count).sum::<usize>(), 100);
        assert_eq!(runs.first().map(|r| r.count), Some(MAX_GSO_BYTES / 1452));
        // Contiguous and complete.
        for w in runs.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
    }

    #[test]
    fn a_shorter_datagram_ends_a_run_and_peers_are_never_mixed() {
        let runs = plan(
            64,
            &[
                (1, 1000),
                (1, 1000),
                (1, 600),
                (1, 1000),
                (2, 1000),
                (1, 1000),
            ],
        );
        let shape: Vec<(u16, usize, usize)> = runs
            .iter()
            .map(|r| (r.dst.port(), r.count, r.segment))
            .collect();
        assert_eq!(
            shape,
            vec![(1, 3, 1000), (1, 1, 1000), (2, 1, 1000), (1, 1, 1000)]
        );
        // A larger datagram cannot join a run of smaller ones.
        let runs = plan(64, &[(1, 500), (1, 900)]);
        assert_eq!(runs.len(), 2);
        // Without GSO every datagram is its own send.
        assert_eq!(plan(1, &[(1, 100); 5]).len(), 5);
    }
}
