//! Turns the JSON lines of many runs into BENCHMARKS.md tables (medians of
//! repeated runs, ratios against the ceiling and the peer) and SVG plots.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

/// Median of a metric over the runs of one configuration.
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn get(v: &Value, path: &str) -> Option<f64> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_f64)
}

/// Runs of one configuration: same scenario, server, transport and shape.
struct Runs<'a> {
    runs: Vec<&'a Value>,
}

impl Runs<'_> {
    fn median(&self, path: &str) -> Option<f64> {
        median(self.runs.iter().filter_map(|r| get(r, path)).collect())
    }
    fn all_ok(&self) -> bool {
        self.runs.iter().all(|r| r["ok"] == Value::Bool(true))
    }
}

fn key(v: &Value, shape: &[&str]) -> String {
    let mut k = format!(
        "{}|{}|{}",
        v["scenario"].as_str().unwrap_or("?"),
        v["server"].as_str().unwrap_or("?"),
        v["transport"].as_str().unwrap_or("?")
    );
    for s in shape {
        k.push('|');
        k.push_str(&v[*s].to_string());
    }
    k
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "–".into(),
        Some(x) if x >= 1e6 => format!("{:.2}M{unit}", x / 1e6),
        Some(x) if x >= 1e4 => format!("{:.1}k{unit}", x / 1e3),
        Some(x) if x >= 100.0 => format!("{x:.0}{unit}"),
        Some(x) => format!("{x:.1}{unit}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// Writes the markdown tables to stdout and the plots into `out_dir`.
pub(crate) fn report(results: &Path, out_dir: &Path) -> std::io::Result<()> {
    let text = std::fs::read_to_string(results)?;
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let group = |scenario: &str, shape: &[&str]| {
        let mut map: BTreeMap<String, Runs<'_>> = BTreeMap::new();
        for v in lines.iter().filter(|v| v["scenario"] == scenario) {
            map.entry(key(v, shape))
                .or_insert(Runs { runs: Vec::new() })
                .runs
                .push(v);
        }
        map
    };
    let label = |r: &Runs<'_>| {
        format!(
            "{} / {}",
            r.runs[0]["server"].as_str().unwrap_or("?"),
            r.runs[0]["transport"].as_str().unwrap_or("?")
        )
    };

    // Idle.
    let idle = group("idle", &["connections"]);
    println!("### idle: authenticated idle connections\n");
    println!("| server / transport | connections | server RSS per connection | connect+auth per s | runs | all ok |");
    println!("|---|---|---|---|---|---|");
    for r in idle.values() {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            label(r),
            r.runs[0]["connections"],
            fmt(r.median("server_rss_per_conn_bytes"), " B"),
            fmt(r.median("connect_auth_per_s"), ""),
            r.runs.len(),
            r.all_ok()
        );
    }

    // Fanout.
    let fanout = group("fanout", &["members", "rate", "msg_bytes"]);
    // A baseline on the same transport if it was measured (the ceiling over
    // binary WebSocket), else its TCP figure, else whatever it has (the
    // peer speaks socket.io only).
    let reference = |server: &str, v: &Value, metric: &str| {
        let on = |transport: Option<&Value>| {
            fanout
                .values()
                .find(|r| {
                    r.runs[0]["server"] == server
                        && transport.is_none_or(|t| r.runs[0]["transport"] == *t)
                        && r.runs[0]["members"] == v["members"]
                        && r.runs[0]["rate"] == v["rate"]
                })
                .and_then(|r| r.median(metric))
        };
        on(Some(&v["transport"]))
            .or_else(|| on(Some(&Value::from("tcp"))))
            .or_else(|| on(None))
    };
    println!("\n### fanout: one sender, one group\n");
    println!("| server / transport | members | rate | delivered msgs/s | vs ceiling | vs peer | server CPU ns/delivery | p50 | p99 | p99 vs ceiling | max | runs | all ok |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in fanout.values() {
        let v = r.runs[0];
        let rate = if v["rate"].is_null() {
            "max".to_string()
        } else {
            format!("{}/s", v["rate"])
        };
        let d = r.median("delivered_per_s");
        let p99 = r.median("latency.p99_us");
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            label(r),
            v["members"],
            rate,
            fmt(d, ""),
            ratio(d, reference("ceiling", v, "delivered_per_s")),
            ratio(d, reference("peer", v, "delivered_per_s")),
            fmt(r.median("server_cpu_ns_per_delivery"), ""),
            fmt(r.median("latency.p50_us"), " µs"),
            fmt(p99, " µs"),
            ratio(p99, reference("ceiling", v, "latency.p99_us")),
            fmt(r.median("latency.max_us"), " µs"),
            r.runs.len(),
            r.all_ok()
        );
    }

    // Pairs.
    let pairs = group("pairs", &["pairs"]);
    let ceiling_on = |transport: &Value| {
        pairs
            .values()
            .find(|r| r.runs[0]["server"] == "ceiling" && r.runs[0]["transport"] == *transport)
            .and_then(|r| r.median("round_trips_per_s"))
    };
    let peer_rt = pairs
        .values()
        .find(|r| r.runs[0]["server"] == "peer")
        .and_then(|r| r.median("round_trips_per_s"));
    println!("\n### pairs: 1:1 ping-pong\n");
    println!("| server / transport | pairs | round trips/s | vs ceiling | vs peer | server CPU ns/round trip | p50 | p99 | runs | all ok |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in pairs.values() {
        let rt = r.median("round_trips_per_s");
        let ceiling_rt =
            ceiling_on(&r.runs[0]["transport"]).or_else(|| ceiling_on(&Value::from("tcp")));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            label(r),
            r.runs[0]["pairs"],
            fmt(rt, ""),
            ratio(rt, ceiling_rt),
            ratio(rt, peer_rt),
            fmt(r.median("server_cpu_ns_per_round_trip"), ""),
            fmt(r.median("latency.p50_us"), " µs"),
            fmt(r.median("latency.p99_us"), " µs"),
            r.runs.len(),
            r.all_ok()
        );
    }

    // Mixed.
    let mixed = group("mixed", &["users", "rate_per_user"]);
    println!("\n### mixed: many groups, 1:1 and group traffic at a fixed offered load\n");
    println!("| server / transport | users | offered msgs/s | deliveries | server CPU ns/delivery | p50 | p99 | runs | all ok |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in mixed.values() {
        let v = r.runs[0];
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            label(r),
            v["users"],
            fmt(r.median("offered_msgs_per_s"), ""),
            fmt(r.median("deliveries"), ""),
            fmt(r.median("server_cpu_ns_per_delivery"), ""),
            fmt(r.median("latency.p50_us"), " µs"),
            fmt(r.median("latency.p99_us"), " µs"),
            r.runs.len(),
            r.all_ok()
        );
    }

    // Plots.
    std::fs::create_dir_all(out_dir)?;
    let series =
        |map: &BTreeMap<String, Runs<'_>>, x: &str, y: &str, filter: &dyn Fn(&Value) -> bool| {
            let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for r in map.values().filter(|r| filter(r.runs[0])) {
                if let (Some(xv), Some(yv)) = (get(r.runs[0], x), r.median(y)) {
                    lines.entry(label(r)).or_default().push((xv, yv));
                }
            }
            for pts in lines.values_mut() {
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            lines
        };
    let max_rate = |v: &Value| v["rate"].is_null();
    plot(
        &out_dir.join("fanout_throughput.svg"),
        "fan-out: delivered msgs/s by group size",
        "group members",
        "delivered msgs/s",
        &series(&fanout, "members", "delivered_per_s", &max_rate),
    )?;
    plot(
        &out_dir.join("fanout_p99.svg"),
        "fan-out at max rate: p99 latency (µs) by group size",
        "group members",
        "p99 latency (µs)",
        &series(&fanout, "members", "latency.p99_us", &max_rate),
    )?;
    let rss_mib = {
        let mut m = series(&idle, "connections", "server_rss_after_bytes", &|_| true);
        for pts in m.values_mut() {
            for p in pts.iter_mut() {
                p.1 /= 1024.0 * 1024.0;
            }
        }
        m
    };
    plot(
        &out_dir.join("idle_rss.svg"),
        "server RSS (MiB) by idle connections",
        "connections",
        "RSS (MiB)",
        &rss_mib,
    )?;
    Ok(())
}

fn plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &BTreeMap<String, Vec<(f64, f64)>>,
) -> std::io::Result<()> {
    let err = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let x_max = lines.values().flatten().map(|p| p.0).fold(1.0, f64::max);
    let y_max = lines.values().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max * 1.02, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, pts)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
