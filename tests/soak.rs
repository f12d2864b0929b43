//! The soak at CI scale: a few seconds of steady mixed load with churn; the
//! full-length run is `cargo run --release --example soak -- --seconds 600`.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/soak.rs"]
mod soak;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_stays_steady_and_delivers_every_acknowledged_message_once_in_order() {
    let csv = std::env::temp_dir().join(format!("comet-soak-{}.csv", std::process::id()));
    let verdict = soak::soak(soak::Args {
        seconds: 8,
        warmup: 3,
        clients: 60,
        rate: 300,
        csv: csv.clone(),
        tolerance_pct: 50.0,
    })
    .await
    .unwrap();
    let samples = std::fs::read_to_string(&csv).unwrap();
    std::fs::remove_file(&csv).unwrap();
    assert_eq!(
        samples.lines().count(),
        1 + 8,
        "a header and one row per second"
    );
    // Nobody reconnects in 8 s (the churn starts after 15 s), so every
    // acknowledged message must reach every recipient live: exactly once,
    // in order, without a gap, with nothing left for the final sync.
    assert!(
        verdict.sent > 0 && verdict.acked == verdict.sent,
        "{verdict:?}"
    );
    assert_eq!(verdict.refused, 0);
    assert!(verdict.settled, "{verdict:?}");
    assert_eq!(
        (
            verdict.lost,
            verdict.duplicates,
            verdict.out_of_order,
            verdict.gaps,
            verdict.corrupt
        ),
        (0, 0, 0, 0, 0),
        "{verdict:?}"
    );
    assert_eq!(
        (verdict.reconnects, verdict.recovered),
        (0, 0),
        "{verdict:?}"
    );
    assert!(verdict.steady, "{verdict:?}");
    assert!(verdict.passed());
}
