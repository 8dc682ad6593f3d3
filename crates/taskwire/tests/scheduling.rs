//! Scheduling within one connection, against a real server: a batch of equal
//! long tasks streams its results in submission order (past the threshold the
//! oldest goes first), and a short task sent after them still finishes early
//! (below the threshold, least attained service first). Outcomes only: the
//! order of the replies, never their timing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// Sends `count` × `spin` of `ms` and then one short `spin` of `short_ms` on
/// one connection; returns the ids in the order their replies came
/// (the short one has id `count`).
async fn completion_order(cfg: taskwire::Config, count: u64, ms: u64, short_ms: u64) -> Vec<u64> {
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    for id in 0..count {
        c.request(id, "spin", json!({ "ms": ms })).await;
    }
    c.request(count, "spin", json!({ "ms": short_ms })).await;
    let mut order = Vec::new();
    while order.len() as u64 <= count {
        let m = c.recv().await.expect("the connection stays open");
        if m.get("method").is_some() {
            continue; // a notification
        }
        assert!(m["result"]["spunMs"].is_u64(), "{m}");
        order.push(m["id"].as_u64().expect("one of our ids"));
    }
    s.stop().await.expect("clean shutdown");
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_equal_tasks_finishes_in_submission_order() {
    let mut cfg = config();
    cfg.workers = Some(2);
    cfg.las_threshold = Duration::from_millis(10);
    let order = completion_order(cfg, 64, 40, 5).await;
    eprintln!("completion order: {order:?}");
    let batch: Vec<u64> = order.iter().copied().filter(|&id| id < 64).collect();
    // Most of the first half finishes before most of the second half: count
    // the first half's ids among the first 32 replies of the batch.
    let early = batch[..32].iter().filter(|&&id| id < 32).count();
    assert!(
        early >= 24,
        "only {early} of the first 32 submitted among the first 32 done: {order:?}"
    );
    // The short task, sent last, is not left for last: it stays below the
    // threshold, where the least served goes first.
    let short_at = order.iter().position(|&id| id == 64).expect("answered");
    assert!(
        short_at < 48,
        "the 5 ms task finished {short_at}th of 65: {order:?}"
    );
}

/// A threshold of "never" keeps least attained service throughout (the
/// policy before the threshold existed): the short task still finishes before
/// the batch's end, and every task is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_threshold_keeps_least_attained_service() {
    let mut cfg = config();
    cfg.workers = Some(2);
    cfg.las_threshold = Duration::from_millis(u64::MAX);
    let order = completion_order(cfg, 32, 20, 5).await;
    assert_eq!(order.len(), 33);
    let short_at = order.iter().position(|&id| id == 32).expect("answered");
    assert!(
        short_at < 24,
        "the 5 ms task finished {short_at}th of 33: {order:?}"
    );
}
