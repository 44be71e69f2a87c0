use std::process::ExitCode;

use cis490::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // (A server's episodes' lines also go to their clients.)
    cis490::serve::Logger::new(
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .format_target(false)
            .format_timestamp_millis()
            .build(),
    )
    .install();
    let argv: Vec<String> = std::env::args().collect();
    let result = match cli.command {
        Command::Trace(args) => {
            let dir = match args.server.clone() {
                Some(socket) => {
                    // `cis490 trace`'s own arguments, for the server.
                    let raw = argv
                        .iter()
                        .skip_while(|a| *a != "trace")
                        .skip(1)
                        .cloned()
                        .collect();
                    cis490::serve::client::run(args, raw, &socket)
                }
                None => cis490::trace::run(args.into_config(argv)),
            };
            dir.map(|dir| {
                // The last line on stdout is the episode directory.
                println!("{}", dir.display());
            })
        }
        Command::Serve(args) => cis490::serve::run(args),
        Command::Summary(args) => cis490::summary::run(&args.episode, args.json),
        Command::Report(args) => {
            let out = args
                .output
                .unwrap_or_else(|| args.episode.join(cis490::report::FILE));
            cis490::report::write(&args.episode, &out).map(|bytes| {
                eprintln!("report: {} KiB", bytes.div_ceil(1024));
                // The last line on stdout is the page.
                println!("{}", out.display());
            })
        }
        Command::Check(args) => cis490::check::run(&args.episode),
        Command::Export(args) => cis490::dataset::export::run(&args.episodes, &args.to),
        Command::Ship(args) => cis490::dataset::ship::run(
            &args.data_dir,
            &args.to,
            args.endpoint.as_deref(),
            args.delete_local,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped reading (`cis490 summary EP | head`) is not
        // an error of ours.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
