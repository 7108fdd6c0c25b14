//! Integration tests: the real proxy, in-process on 127.0.0.1:0 (or the
//! real binary for process-level behaviour), with certificates generated per
//! test and real backends and clients.

mod common;

mod abuse;
mod acme;
mod admin;
mod bootstrap;
mod cert_files;
mod config;
mod connect;
mod export;
mod grpc;
mod h2_abuse;
mod h2pool;
mod http;
mod ipv6;
mod limits;
mod local_ca;
mod mtls;
mod netns;
mod outbound;
mod outbound_live;
mod pebble_smoke;
mod pool;
mod process;
mod reload;
mod semantics;
mod shutdown;
mod sni;
mod tcp;
mod testssl;
