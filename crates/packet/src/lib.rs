//! IP packet parsing for the data plane.
//!
//! What it does: turns the bytes of one decrypted (or TUN-read) IP packet into a
//! [`PacketMeta`]: addresses, protocol, ports, TCP flags and sequence numbers, ICMP kind
//! (with the header of the packet an ICMP error quotes), and fragment information. It also
//! builds the TCP resets the gateway injects when it cuts a flow ([`build_tcp_rst`]).
//!
//! What it deliberately does not: no reassembly, no checksum verification of the inner
//! packet (the kernel on either side does that), no state. Parsing is by slicing with
//! etherparse; nothing is copied.
//!
//! Bad input: every malformed packet is a [`ParseError`] value, never a panic; the
//! property tests below feed random and truncated bytes.

use std::net::IpAddr;

use etherparse::{
    IpNumber, IpSlice, Ipv6ExtensionSlice, LaxIpSlice, TcpHeaderSlice, UdpHeaderSlice,
};
pub use portcullis_model::Protocol;

/// Why a packet could not be parsed. Each one is counted by the core as "malformed".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty packet")]
    Empty,
    #[error("malformed ip header: {0}")]
    Ip(String),
    #[error("truncated {0} header")]
    TruncatedTransport(&'static str),
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as source or destination: never
    /// valid on the wire (RFC 4291 2.5.5.2), and a way to dress an IPv4 destination up
    /// as an IPv6 one.
    #[error("ipv4-mapped ipv6 address {0} in a packet")]
    MappedAddress(IpAddr),
}

/// TCP flag bits as in the header's byte 13.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// How a packet relates to IP fragmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// An unfragmented packet.
    None,
    /// Offset 0 with more fragments to come: carries the transport header.
    First { id: u32 },
    /// Offset > 0: no transport header; only the fragment id links it to its flow.
    Later { id: u32 },
}

/// The transport-level view of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        /// Sequence space this segment consumes (payload, +1 for SYN, +1 for FIN).
        seq_len: u32,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// ICMP / ICMPv6 echo request or reply; `id` plays the role of both ports.
    IcmpEcho {
        request: bool,
        id: u16,
    },
    /// An ICMP error (unreachable, too big, time exceeded, parameter problem) quoting the
    /// start of the packet that caused it.
    IcmpError {
        quoted: Quoted,
    },
    /// Any other ICMP message.
    IcmpOther {
        icmp_type: u8,
    },
    /// A protocol without ports, decided by protocol number.
    Other,
    /// A non-first fragment: the transport header is in another packet.
    Fragment,
}

/// The addresses and ports of the packet an ICMP error quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Everything the data plane needs to know about one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketMeta {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub transport: Transport,
    pub fragment: Fragment,
}

impl PacketMeta {
    /// Source and destination ports (ICMP echo: the identifier twice; none: zeros).
    #[inline]
    pub fn ports(&self) -> (u16, u16) {
        match self.transport {
            Transport::Tcp {
                src_port, dst_port, ..
            }
            | Transport::Udp { src_port, dst_port } => (src_port, dst_port),
            Transport::IcmpEcho { id, .. } => (id, id),
            _ => (0, 0),
        }
    }
}

/// Parses one IP packet (IPv4 or IPv6, version from the first nibble).
pub fn parse(packet: &[u8]) -> Result<PacketMeta, ParseError> {
    if packet.is_empty() {
        return Err(ParseError::Empty);
    }
    let ip = IpSlice::from_slice(packet).map_err(|e| ParseError::Ip(e.to_string()))?;
    for addr in [ip.source_addr(), ip.destination_addr()] {
        if let IpAddr::V6(v6) = addr {
            if v6.to_ipv4_mapped().is_some() {
                return Err(ParseError::MappedAddress(addr));
            }
        }
    }
    let payload = ip.payload();
    let protocol = Protocol(payload.ip_number.0);
    let fragment = fragment_of(&ip);
    let transport = match fragment {
        Fragment::Later { .. } => Transport::Fragment,
        _ => parse_transport(payload.ip_number, payload.payload)?,
    };
    Ok(PacketMeta {
        src: ip.source_addr(),
        dst: ip.destination_addr(),
        protocol,
        transport,
        fragment,
    })
}

fn fragment_of(ip: &IpSlice<'_>) -> Fragment {
    match ip {
        IpSlice::Ipv4(v4) => {
            let h = v4.header();
            if !h.is_fragmenting_payload() {
                return Fragment::None;
            }
            let id = u32::from(h.identification());
            if h.fragments_offset().value() == 0 {
                Fragment::First { id }
            } else {
                Fragment::Later { id }
            }
        }
        IpSlice::Ipv6(v6) => {
            if !v6.is_payload_fragmented() {
                return Fragment::None;
            }
            for ext in v6.extensions().clone() {
                if let Ipv6ExtensionSlice::Fragment(f) = ext {
                    if f.is_fragmenting_payload() {
                        let id = f.identification();
                        return if f.fragment_offset().value() == 0 {
                            Fragment::First { id }
                        } else {
                            Fragment::Later { id }
                        };
                    }
                }
            }
            // etherparse said fragmented but we found no header: treat as a later fragment
            // so it can never pass without its first fragment.
            Fragment::Later { id: 0 }
        }
    }
}

fn parse_transport(ip_number: IpNumber, payload: &[u8]) -> Result<Transport, ParseError> {
    match ip_number {
        IpNumber::TCP => {
            let tcp = TcpHeaderSlice::from_slice(payload)
                .map_err(|_| ParseError::TruncatedTransport("tcp"))?;
            let flags = payload.get(13).copied().unwrap_or(0) & 0x3f;
            let data_len = payload.len().saturating_sub(tcp.slice().len()) as u32;
            let seq_len = data_len
                + u32::from(flags & tcp_flags::SYN != 0)
                + u32::from(flags & tcp_flags::FIN != 0);
            Ok(Transport::Tcp {
                src_port: tcp.source_port(),
                dst_port: tcp.destination_port(),
                flags,
                seq: tcp.sequence_number(),
                ack: tcp.acknowledgment_number(),
                seq_len,
            })
        }
        IpNumber::UDP => {
            let udp = UdpHeaderSlice::from_slice(payload)
                .map_err(|_| ParseError::TruncatedTransport("udp"))?;
            Ok(Transport::Udp {
                src_port: udp.source_port(),
                dst_port: udp.destination_port(),
            })
        }
        IpNumber::ICMP => parse_icmp(payload, false),
        IpNumber::IPV6_ICMP => parse_icmp(payload, true),
        _ => Ok(Transport::Other),
    }
}

fn parse_icmp(payload: &[u8], v6: bool) -> Result<Transport, ParseError> {
    let name = if v6 { "icmpv6" } else { "icmp" };
    let (icmp_type, id, quoted) = match payload {
        [t, _code, _c0, _c1, i0, i1, _, _, rest @ ..] => (*t, u16::from_be_bytes([*i0, *i1]), rest),
        _ => return Err(ParseError::TruncatedTransport(name)),
    };
    let (echo_request, echo_reply, is_error) = if v6 {
        (128, 129, matches!(icmp_type, 1..=4))
    } else {
        (8, 0, matches!(icmp_type, 3 | 11 | 12))
    };
    if icmp_type == echo_request || icmp_type == echo_reply {
        return Ok(Transport::IcmpEcho {
            request: icmp_type == echo_request,
            id,
        });
    }
    if is_error {
        if let Some(quoted) = parse_quoted(quoted) {
            return Ok(Transport::IcmpError { quoted });
        }
        return Err(ParseError::TruncatedTransport(name));
    }
    Ok(Transport::IcmpOther { icmp_type })
}

/// Parses the (usually truncated) packet quoted in an ICMP error.
fn parse_quoted(bytes: &[u8]) -> Option<Quoted> {
    let (ip, _) = LaxIpSlice::from_slice(bytes).ok()?;
    let payload = ip.payload();
    let protocol = Protocol(payload.ip_number.0);
    let p = payload.payload;
    let (src_port, dst_port) = match payload.ip_number {
        IpNumber::TCP | IpNumber::UDP => match p {
            [a, b, c, d, ..] => (u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d])),
            _ => return None,
        },
        IpNumber::ICMP | IpNumber::IPV6_ICMP => match p {
            [_, _, _, _, i0, i1, ..] => {
                let id = u16::from_be_bytes([*i0, *i1]);
                (id, id)
            }
            _ => return None,
        },
        _ => (0, 0),
    };
    Some(Quoted {
        src: ip.source_addr(),
        dst: ip.destination_addr(),
        protocol,
        src_port,
        dst_port,
    })
}

/// Builds a TCP RST from `src:src_port` to `dst:dst_port` with sequence number `seq`
/// (the receiver's next expected sequence number, so RFC 5961 receivers accept it).
/// Returns `None` when the address families differ.
pub fn build_tcp_rst(
    src: IpAddr,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
    seq: u32,
) -> Option<Vec<u8>> {
    let builder = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            etherparse::PacketBuilder::ipv6(s.octets(), d.octets(), 64)
        }
        _ => return None,
    };
    let builder = builder.tcp(src_port, dst_port, seq, 0).rst();
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::from(a)
    }

    fn tcp_packet(flags: &str, payload: &[u8]) -> Vec<u8> {
        let mut b =
            PacketBuilder::ipv4([100, 64, 0, 2], [10, 8, 0, 2], 64).tcp(40000, 22, 1000, 64000);
        if flags.contains('S') {
            b = b.syn();
        }
        if flags.contains('A') {
            b = b.ack(5);
        }
        if flags.contains('F') {
            b = b.fin();
        }
        let mut out = Vec::new();
        let _ = b.write(&mut out, payload);
        out
    }

    #[test]
    fn parses_tcp_syn() -> Result<(), ParseError> {
        let m = parse(&tcp_packet("S", &[]))?;
        assert_eq!(m.src, v4([100, 64, 0, 2]));
        assert_eq!(m.dst, v4([10, 8, 0, 2]));
        assert_eq!(m.protocol, Protocol::TCP);
        assert_eq!(m.ports(), (40000, 22));
        match m.transport {
            Transport::Tcp {
                flags,
                seq,
                seq_len,
                ..
            } => {
                assert_eq!(flags & tcp_flags::SYN, tcp_flags::SYN);
                assert_eq!(seq, 1000);
                assert_eq!(seq_len, 1);
            }
            other => panic!("not tcp: {other:?}"),
        }
        assert_eq!(m.fragment, Fragment::None);
        Ok(())
    }

    #[test]
    fn tcp_seq_len_counts_payload_and_fin() -> Result<(), ParseError> {
        let m = parse(&tcp_packet("AF", b"hello"))?;
        assert!(matches!(m.transport, Transport::Tcp { seq_len: 6, .. }));
        Ok(())
    }

    #[test]
    fn parses_udp_v6() -> Result<(), ParseError> {
        let b = PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).udp(5353, 53);
        let mut out = Vec::new();
        let _ = b.write(&mut out, b"q");
        let m = parse(&out)?;
        assert_eq!(m.protocol, Protocol::UDP);
        assert_eq!(m.ports(), (5353, 53));
        assert!(m.src.is_ipv6());
        Ok(())
    }

    #[test]
    fn parses_icmp_echo_and_error() -> Result<(), ParseError> {
        let b = PacketBuilder::ipv4([100, 64, 0, 2], [10, 8, 0, 2], 64).icmpv4_echo_request(77, 1);
        let mut echo = Vec::new();
        let _ = b.write(&mut echo, b"ping");
        let m = parse(&echo)?;
        assert_eq!(
            m.transport,
            Transport::IcmpEcho {
                request: true,
                id: 77
            }
        );
        assert_eq!(m.ports(), (77, 77));

        // A "fragmentation needed" error from the server side quoting our TCP SYN.
        let quoted = tcp_packet("S", &[]);
        let b = PacketBuilder::ipv4([10, 8, 0, 1], [100, 64, 0, 2], 64).icmpv4(
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1300,
                },
            ),
        );
        let mut err = Vec::new();
        let _ = b.write(&mut err, quoted.get(..28).unwrap_or(&quoted));
        let m = parse(&err)?;
        match m.transport {
            Transport::IcmpError { quoted } => {
                assert_eq!(quoted.src, v4([100, 64, 0, 2]));
                assert_eq!(quoted.dst_port, 22);
                assert_eq!(quoted.protocol, Protocol::TCP);
            }
            other => panic!("expected icmp error, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn ipv4_fragments_are_classified() -> Result<(), ParseError> {
        let mut p = tcp_packet("A", &[0u8; 64]);
        // Set MF, offset 0, id 0x1234 → first fragment.
        p[4] = 0x12;
        p[5] = 0x34;
        p[6] = 0x20;
        p[7] = 0;
        let m = parse(&p)?;
        assert_eq!(m.fragment, Fragment::First { id: 0x1234 });
        assert!(matches!(m.transport, Transport::Tcp { .. }));
        // Offset 8 (×8 bytes), no MF → last fragment.
        p[6] = 0;
        p[7] = 8;
        let m = parse(&p)?;
        assert_eq!(m.fragment, Fragment::Later { id: 0x1234 });
        assert_eq!(m.transport, Transport::Fragment);
        assert_eq!(m.ports(), (0, 0));
        Ok(())
    }

    #[test]
    fn other_protocols_parse_by_number() -> Result<(), ParseError> {
        let mut p = tcp_packet("S", &[]);
        p[9] = 47; // GRE; header checksum is not verified by the parser
        let m = parse(&p)?;
        assert_eq!(m.protocol, Protocol(47));
        assert_eq!(m.transport, Transport::Other);
        Ok(())
    }

    #[test]
    fn truncated_and_wrong_lengths_are_errors() {
        let p = tcp_packet("S", &[]);
        for cut in 0..p.len() {
            assert!(parse(&p[..cut]).is_err(), "cut at {cut} parsed");
        }
        let mut long = p.clone();
        long[2] = 0xff; // total length beyond the slice
        assert!(parse(&long).is_err());
        assert!(parse(&[0x55; 40]).is_err());
    }

    #[test]
    fn rst_is_a_valid_tcp_packet() -> Result<(), ParseError> {
        let rst = build_tcp_rst(v4([10, 8, 0, 2]), 22, v4([100, 64, 0, 2]), 40000, 99)
            .ok_or(ParseError::Empty)?;
        let m = parse(&rst)?;
        assert!(matches!(
            m.transport,
            Transport::Tcp { flags, seq: 99, .. } if flags & tcp_flags::RST != 0
        ));
        assert!(build_tcp_rst(
            v4([1, 1, 1, 1]),
            1,
            "::1".parse().map_err(|_| ParseError::Empty)?,
            1,
            0
        )
        .is_none());
        Ok(())
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn mutated_valid_packets_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            flips in proptest::collection::vec((0usize..120, any::<u8>()), 1..6),
            cut in 0usize..130,
            v6 in any::<bool>(),
        ) {
            let mut out = Vec::new();
            if v6 {
                let _ = PacketBuilder::ipv6([1; 16], [2; 16], 9).tcp(1, 2, 3, 4).write(&mut out, &payload);
            } else {
                let _ = PacketBuilder::ipv4([1; 4], [2; 4], 9).udp(1, 2).write(&mut out, &payload);
            }
            for (i, b) in flips {
                if let Some(x) = out.get_mut(i) { *x = b; }
            }
            out.truncate(cut);
            let _ = parse(&out);
        }

        #[test]
        fn valid_tcp_round_trips(sp in any::<u16>(), dp in any::<u16>(), seq in any::<u32>(),
                                 payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut out = Vec::new();
            let _ = PacketBuilder::ipv4([100, 64, 0, 9], [10, 0, 0, 1], 9).tcp(sp, dp, seq, 1).write(&mut out, &payload);
            let m = parse(&out);
            prop_assert!(m.is_ok());
            if let Ok(m) = m {
                prop_assert_eq!(m.ports(), (sp, dp));
                let ok = matches!(m.transport, Transport::Tcp { seq: s, seq_len, .. } if s == seq && seq_len as usize == payload.len());
                prop_assert!(ok, "unexpected transport {:?}", m.transport);
            }
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_malformed() {
        use etherparse::PacketBuilder;
        let mapped = std::net::Ipv4Addr::new(10, 8, 200, 9)
            .to_ipv6_mapped()
            .octets();
        let mut src = [0u8; 16];
        src[0] = 0xfd;
        src[15] = 2;
        let b = PacketBuilder::ipv6(src, mapped, 64).tcp(40000, 443, 1, 1000);
        let mut out = Vec::new();
        assert!(b.write(&mut out, &[]).is_ok());
        assert!(matches!(parse(&out), Err(ParseError::MappedAddress(_))));
        let b = PacketBuilder::ipv6(mapped, src, 64).udp(53, 40000);
        let mut out = Vec::new();
        assert!(b.write(&mut out, &[]).is_ok());
        assert!(matches!(parse(&out), Err(ParseError::MappedAddress(_))));
    }
}
