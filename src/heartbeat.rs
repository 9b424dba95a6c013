//! The heartbeat: ONE thread that pings every open connection on a clock.
//!
//! A client that only listens would otherwise send nothing, and its reader, which closes a
//! connection it has heard nothing from for the idle timeout (2.5 pings), could not tell it
//! from a peer that vanished without a FIN. The ping makes a live client answer with a pong.
//! One clock for every client costs one thread in all instead of a timer per client; each
//! ping is a non-blocking write through the client's [`crate::connection::Connection`], in order
//! with everything else it is sent.

use std::sync::Arc;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::shared::Shared;
use crate::wire::Frame;

/// Pings every connection each `ping_interval` until `stop` disconnects (its sender, held by
/// the [`crate::ServerHandle`], is dropped at shutdown).
pub fn run(shared: Arc<Shared>, stop: Receiver<()>) {
    let ping = Frame::ping();
    loop {
        match stop.recv_timeout(shared.config.ping_interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        // Connections still in their handshake, closing or full refuse the ping: nothing to do.
        for connection in shared.connections.all() {
            connection.send(ping.clone());
        }
    }
}
