//! The HTTP side cannot die or be held by one client: fd exhaustion, a slow reader, `/metrics`.
