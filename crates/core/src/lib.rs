//! The sans-IO core of the Portcullis gateway.
//!
//! What it does: everything between a UDP datagram arriving and a packet leaving, as a
//! state machine that takes `now` and bytes and returns what to send and what happened:
//! WireGuard termination ([`Gateway`], boringtun's `noise::Tunn` per peer), sessions,
//! anti-spoofing, the stateful flow table ([`flow`]), per-flow Cedar decisions, return
//! traffic, fragments, timeouts, re-decision after policy or identity changes, revocation,
//! and the TCP resets that cut a flow in flight ([`enforce`]); taking over a session
//! another cluster node had, by initiating the handshake ([`resume`]).
//!
//! What it deliberately does not: no sockets, no TUN device, no tokio, no file writes, and
//! no clock reads for any decision: time comes in as `now`. The one exception is a clock
//! the data plane may lend ([`Gateway::set_decision_clock`]) only to time first-packet
//! decisions for `/metrics`. The data plane (`portcullis-io`) drives it; tests drive it
//! directly with a virtual clock and real boringtun clients.
//!
//! Seams for other subsystems: [`Gateway::poll_event`] (audit), [`Gateway::handle_identity_change`]
//! and [`Gateway::handle_session_kill`] (identity, offboarding), [`Gateway::handle_peer_add`] and
//! [`Gateway::handle_peer_remove`] (enrollment), [`Gateway::handle_policy_bundle`] (reload).

pub mod enforce;
pub mod flow;
pub mod gateway;
pub mod resume;

pub use enforce::{Drop, EnforceStats, Enforcer, FlowLimits, Injected, PeerCtx};
pub use flow::{FlowKey, FlowState, PeerId, Timeouts};
pub use gateway::{
    b64, ControlError, Gateway, GatewayConfig, IdentityOutcome, PeerSpec, SessionInfo, Transmit,
    WgStats, MAX_PACKET, TIMER_TICK,
};
