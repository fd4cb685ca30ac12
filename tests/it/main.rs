//! The integration tests: one binary, a module per area. Everything runs over
//! real loopback HTTP against a real SQLite file; the crash test runs the real
//! `sluice` binary and kills it with SIGKILL.

mod abuse;
mod admin;
mod agent_server;
mod author;
mod bench;
mod cli;
mod config;
mod corpus;
mod costs;
mod crash;
mod dedup;
mod dispatch;
mod dispatch_review;
mod engine;
mod envelope;
mod explain;
mod export;
mod fuzz;
mod grants;
mod guard;
mod idle;
mod languages;
mod metrics;
mod nats_cluster;
mod nats_dispatch;
mod nats_scale;
mod nats_store;
mod ready;
mod regression;
mod reload;
mod routing;
mod rule_logs;
mod rules;
mod samples;
mod store;
mod support;
mod transports;
mod vectors;
mod wit_versions;
