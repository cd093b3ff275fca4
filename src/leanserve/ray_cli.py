"""`leanserve ray-serve`: leanserve replicas on Ray Serve (serve/ray_app.py), until interrupted."""
import argparse
import os
import signal


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="leanserve ray-serve", description="other flags: those of `leanserve serve`")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default 1)")
    scale.add_argument("--min-replicas", type=int, default=None, help="autoscale from N (0: scale to zero)")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscale up to N")
    parser.add_argument("--replica-cpus", type=float, default=1, help="CPUs (and torch threads) of one replica")
    parser.add_argument("--host", default="127.0.0.1", help="the Serve HTTP proxy's address")
    parser.add_argument("--port", type=int, default=8000, help="the Serve HTTP proxy's port")
    args, serve_argv = parser.parse_known_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on by default
    import ray
    from ray import serve

    from .serve.ray_app import build_app

    ray.init(runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}})
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(num_replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                        replica_cpus=args.replica_cpus, serve_argv=tuple(serve_argv)), name="leanserve", route_prefix="/")
    print(f"leanserve on Ray Serve: http://{args.host}:{args.port}")
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    serve.shutdown()
    return 0
