//! Per-address limits: the connection cap and handshake rate per address (a second address,
//! 127.0.0.2, still admitted), the say rate across one address's connections, `--trust-proxy`.
