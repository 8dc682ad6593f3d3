//! The library's error names what went wrong and where: the address that
//! could not be bound, the setting that was refused.

use taskwire::{Config, Error, Registry, Server};

fn registry() -> Registry {
    let mut r = Registry::new();
    taskwire::builtin::register(&mut r).expect("the built-ins register");
    r
}

#[tokio::test]
async fn a_port_in_use_names_the_address() {
    // Held for the whole test: the server's bind must find it taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = taken.local_addr().expect("its address");
    let cfg = Config {
        addr,
        nice: 0,
        ..Config::default()
    };
    let err = Server::bind(cfg, registry())
        .await
        .expect_err("the port is in use");
    match &err {
        Error::Bind { addr: a, .. } => assert_eq!(*a, addr),
        other => panic!("expected Error::Bind, got {other:?}"),
    }
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    drop(taken);
}

#[tokio::test]
async fn an_invalid_config_names_the_setting() {
    let cfg = Config {
        addr: "127.0.0.1:0".parse().expect("an address"),
        admin_token: Some(String::new()),
        ..Config::default()
    };
    let err = Server::bind(cfg.clone(), registry())
        .await
        .expect_err("an empty admin token is refused");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("admin_token"), "{err}");
    // The same from `build`, which binds nothing.
    let err = Server::build(cfg, registry()).expect_err("refused there too");
    assert!(err.to_string().contains("admin_token"), "{err}");
}
