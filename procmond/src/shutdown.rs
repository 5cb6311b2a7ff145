//! What asks the daemon's main thread to shut down: a signal (or the
//! console's Ctrl+C on Windows), or the agent's GracefulShutdown RPC,
//! which is answered once everything is flushed.

use daemoneye_bus::Message;

/// A request to shut the daemon down, for its main thread.
#[derive(Debug)]
pub struct ShutdownRequest {
    /// Why (for the log).
    pub reason: String,
    /// The RPC to answer once done, if it came over the bus.
    pub rpc: Option<Message>,
}
