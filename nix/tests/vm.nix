# NixOS VM test: a builder signs its builds with the post-build-hook and pushes them to a
# cache; a consumer substitutes through the gate; a tampered trace is refused.
#
#   nix build .#checks.x86_64-linux.vm -L        (needs KVM)
#
# Machines
#   builder   services.tracehook.sign; builds nix/tests/chain.nix twice (salts "good" and
#             "tampered"), `nix copy`s the outputs to the cache; the publisher (user
#             tracehook) delivers the spooled traces to the cache's trace store; a chained
#             hook records every build after it was signed.
#   cache     nginx with WebDAV PUT: a binary cache at /cache and a trace store at /traces.
#   consumer  services.tracehook.gate (exclusive, trusting only the builder's trace key and
#             the gate's own narinfo key, IP filter to the cache's addresses); instantiates
#             the same chain.nix and realises it with --max-jobs 0, so every output must come
#             through the gate.
#
# The keys below are for this test only, generated for it; never use them anywhere else.
{
  pkgs,
  tracehook ? pkgs.callPackage ../package.nix { },
}:

let
  builderKey = {
    secret = "vm-builder-1:mJj/FA5VSU8mzavFSBGH6Heb9orVZoRA1gxL4/1EM461nKA2ey0V6rwNGXi/OOAcn/mp0XNslMddomWsG1ye1g==";
    public = "vm-builder-1:tZygNnstFeq8DRl4vzjgHJ/5qdFzbJTHXaJlrBtcntY=";
  };
  gateKey = {
    secret = "vm-gate-1:BRnH+lIRsU57MBAQMpc8TplN67nBiMsi+Ar387u4iyGYjx+helD8zSAwm8kc2vZdk87KtHVBJl8zIZKI589ujw==";
    public = "vm-gate-1:mI8foXpQ/M0gMJvJHNr2XZPOyrR1QSZfMyGSiOfPbo8=";
  };

  cacheRoot = "/srv/cache";
  binaryCache = "http://cache/cache";
  traceStore = "http://cache/traces";
  gatePort = 37515;

  # Rewrites, in every trace file of a trace store directory, the claims about one output
  # path: the claimed NAR hash is replaced and the payload re-encoded, the signature kept.
  tamper = pkgs.writeScriptBin "tamper-traces" ''
    #!${pkgs.python3.interpreter}
    import base64, json, pathlib, sys

    directory, target = pathlib.Path(sys.argv[1]), sys.argv[2]
    target_hash = target.rsplit("/", 1)[-1].split("-", 1)[0]

    def b64d(text):
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    def b64e(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    tampered = 0
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        doc = json.loads(path.read_text())
        changed = False
        signatures = []
        for jws in doc["signatures"]:
            header, payload, sig = jws.split(".")
            claim = json.loads(b64d(payload))
            outputs = claim.get("out", {}).get("nix", {})
            hits = [o for o in outputs.values()
                    if isinstance(o, dict) and target_hash in str(o.get("path", ""))]
            for output in hits:
                output["hash"] = "sha256:" + "0" * 52
            if hits:
                payload = b64e(json.dumps(claim, separators=(",", ":")).encode())
                tampered += 1
                changed = True
            signatures.append(".".join((header, payload, sig)))
        if changed:
            doc["signatures"] = signatures
            path.write_text(json.dumps(doc))
            print(f"tampered with {path}")
    if not tampered:
        sys.exit(f"no trace in {directory} claims {target}")
  '';

  chain = ./chain.nix;
  chained = pkgs.writeShellScript "record-build" ''
    echo "$DRV_PATH $OUT_PATHS" >> /var/log/chained-hook.log
  '';
  realise = salt: "nix-build /etc/tracehook-test/chain.nix --no-out-link --argstr salt ${salt} -A b";
in
pkgs.testers.runNixOSTest {
  name = "tracehook";

  nodes = {
    cache =
      { ... }:
      {
        services.nginx = {
          enable = true;
          virtualHosts.cache = {
            default = true;
            root = cacheRoot;
            locations."/".extraConfig = ''
              dav_methods PUT;
              create_full_put_path on;
              dav_access user:rw group:r all:r;
              client_max_body_size 0;
            '';
          };
        };
        systemd.services.nginx.serviceConfig.ReadWritePaths = [ cacheRoot ];
        systemd.tmpfiles.rules = [ "d ${cacheRoot} 0755 nginx nginx -" ];
        networking.firewall.allowedTCPPorts = [ 80 ];
        environment.systemPackages = [ tamper ];
      };

    builder =
      { lib, pkgs, ... }:
      {
        imports = [ ../module.nix ];
        services.tracehook.package = tracehook;
        services.tracehook.sign = {
          enable = true;
          secretKeyFile = "/etc/tracehook-test/builder.sec";
          publishTo = [ traceStore ];
          # Another post-build hook (a cache pusher, say) chained after signing.
          chainHooks = [ chained ];
        };
        environment.etc."tracehook-test/builder.sec" = {
          text = builderKey.secret;
          mode = "0400";
        };
        environment.etc."tracehook-test/chain.nix".source = chain;
        nix.settings = {
          substituters = lib.mkForce [ ];
          # chain.nix's builder; Nix's own sandbox shell, named explicitly.
          extra-sandbox-paths = [ "/bin/sh=${pkgs.busybox-sandbox-shell}/bin/busybox" ];
        };
      };

    consumer =
      { lib, nodes, pkgs, ... }:
      {
        imports = [ ../module.nix ];
        services.tracehook.package = tracehook;
        services.tracehook.gate = {
          enable = true;
          listen = "127.0.0.1:${toString gatePort}";
          upstreams = [ binaryCache ];
          policy = {
            traces = [ traceStore ];
            keys.vm-builder-1 = builderKey.public;
            trust.require = "vm-builder-1";
          };
          secretKeyFile = "/etc/tracehook-test/gate.sec";
          signingPublicKey = gateKey.public;
          allowedIPs = [
            nodes.cache.networking.primaryIPAddress
          ]
          ++ lib.optional (
            nodes.cache.networking.primaryIPv6Address or ""
            != ""
          ) nodes.cache.networking.primaryIPv6Address;
        };
        environment.etc."tracehook-test/gate.sec" = {
          text = gateKey.secret;
          mode = "0400";
        };
        environment.etc."tracehook-test/chain.nix".source = chain;
        # For the last subtest, which builds the refused steps locally.
        nix.settings.extra-sandbox-paths = [ "/bin/sh=${pkgs.busybox-sandbox-shell}/bin/busybox" ];
      };
  };

  testScript = ''
    start_all()

    cache.wait_for_unit("nginx.service")
    cache.wait_for_open_port(80)
    builder.wait_for_unit("multi-user.target")
    builder.wait_for_unit("tracehook-publish.service")

    with subtest("the builder signs every build step with the post-build-hook"):
        def build(salt, attr):
            return builder.succeed(
                f"nix-build /etc/tracehook-test/chain.nix --no-out-link --argstr salt {salt} -A {attr}"
            ).strip()

        a_good, b_good = build("good", "a"), build("good", "b")
        a_bad, b_bad = build("tampered", "a"), build("tampered", "b")
        builder.succeed("grep -q tracehook-vm-b /var/log/tracehook/sign.log")

    with subtest("the chained hook runs after signing, with the hook's environment"):
        chained = builder.succeed("cat /var/log/chained-hook.log")
        assert b_good in chained and a_bad in chained, chained
        builder.succeed("stat -c %U /var/lib/tracehook/spool | grep -qx tracehook")
        builder.succeed("systemctl show -p User tracehook-publish.service | grep -qx User=tracehook")

    with subtest("outputs and traces reach the cache"):
        builder.succeed(
            f"nix --extra-experimental-features nix-command copy --to ${binaryCache} {b_good} {b_bad}"
        )
        cache.wait_until_succeeds(
            "test $(find ${cacheRoot}/traces/traces -type f ! -name '.*' | wc -l) -ge 4",
            timeout=120,
        )

    consumer.wait_for_unit("tracehook-gate.service")
    consumer.wait_for_open_port(${toString gatePort})

    with subtest("the consumer substitutes a traced chain through the gate"):
        out = consumer.succeed("${realise "good"} --max-jobs 0").strip()
        assert out == b_good, f"{out} != {b_good}"
        assert consumer.succeed(f"cat {out}") == builder.succeed(f"cat {b_good}")
        consumer.succeed(f"nix-store --check-validity {a_good}")

    with subtest("a tampered trace deep in the chain is refused"):
        cache.succeed(f"tamper-traces ${cacheRoot}/traces/traces {a_bad}")
        consumer.fail("${realise "tampered"} --max-jobs 0")
        consumer.fail(f"nix-store --check-validity {b_bad}")
        consumer.fail(f"nix-store --check-validity {a_bad}")
        print(consumer.succeed("journalctl -o cat -u tracehook-gate.service"))
        refused = consumer.succeed("tracehook log --refused /var/log/tracehook-gate/gate.log")
        print(refused)
        assert "tracehook-vm-a" in refused, "the refusal names the tampered step"

    with subtest("without --max-jobs 0 the consumer builds the refused steps itself"):
        consumer.succeed("${realise "tampered"}")
        consumer.succeed(f"nix-store --check-validity {b_bad}")
  '';
}
