# benchmarks are run explicitly: pytest benchmarks/ --benchmark-only
