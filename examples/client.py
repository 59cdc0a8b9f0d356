#!/usr/bin/env python3
"""A Python gRPC client for a Tandem server or router (tandem.v1.Generation).

Needs Debian's python3-grpcio and python3-protobuf, and the stubs generated from
proto/tandem.proto (the build writes them to build/python/):

    protoc -I proto --python_out=OUT \
        --plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin --grpc_python_out=OUT \
        proto/tandem.proto
    protoc -I proto/grpc/health/v1 --python_out=OUT \
        --plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin --grpc_python_out=OUT \
        proto/grpc/health/v1/health.proto

Usage:
    /usr/bin/python3 examples/client.py --server 127.0.0.1:50051 --prompt "The quick" \
        [--max-tokens 32] [--temperature 0] [--stream] [--token-file FILE] [--stubs build/python]
"""
import argparse
import os
import sys


def load_stubs(stubs_dir):
    """Imports the generated modules (tandem_pb2, tandem_pb2_grpc, grpc.health.v1)."""
    sys.path.insert(0, stubs_dir)
    import tandem_pb2  # noqa: E402
    import tandem_pb2_grpc  # noqa: E402
    import health_pb2  # noqa: E402  (grpc.health.v1, generated as a top-level module)
    import health_pb2_grpc  # noqa: E402

    return tandem_pb2, tandem_pb2_grpc, health_pb2, health_pb2_grpc


def metadata(token):
    return [("authorization", "Bearer " + token)] if token else []


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="HOST:PORT of a tandem server or router")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=None, help="absent: 1.0; 0: greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--token-file", help="file whose first line is the bearer token")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    p.add_argument("--stubs", default=os.path.join(here, "..", "build", "python"))
    args = p.parse_args()

    import grpc

    pb, pb_grpc, health_pb, health_grpc = load_stubs(args.stubs)
    token = open(args.token_file).readline().strip() if args.token_file else ""
    channel = grpc.insecure_channel(args.server)
    stub = pb_grpc.GenerationStub(channel)

    health = health_grpc.HealthStub(channel).Check(health_pb.HealthCheckRequest(), timeout=5)
    info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata(token), timeout=5)
    print(f"# {info.model} ({info.family}, vocab {info.vocab_size}, context {info.max_seq_len}), "
          f"health {health_pb.HealthCheckResponse.ServingStatus.Name(health.status)}",
          file=sys.stderr)

    request = pb.GenerateRequest(prompt=args.prompt, max_tokens=args.max_tokens)
    if args.temperature is not None:
        request.sampling.temperature = args.temperature  # presence matters: 0 is greedy
    if args.seed is not None:
        request.sampling.seed = args.seed
    try:
        if args.stream:
            sys.stdout.write(args.prompt)
            for message in stub.GenerateStream(request, metadata=metadata(token),
                                               timeout=args.timeout):
                sys.stdout.write(message.text)
                sys.stdout.flush()
                if message.finish_reason:
                    usage = message.usage
            print()
        else:
            response = stub.Generate(request, metadata=metadata(token), timeout=args.timeout)
            print(args.prompt + response.text)
            usage = response.usage
        print(f"# {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens",
              file=sys.stderr)
    except grpc.RpcError as e:
        print(f"client.py: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
