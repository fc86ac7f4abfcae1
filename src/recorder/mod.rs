//! The recorder core: runs a program in a PTY, relays it byte-exact and turns what passes into
//! typed events for the sinks (asciicast file, chunked spool).
