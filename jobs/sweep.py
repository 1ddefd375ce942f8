"""Job entrypoint: A Ray Tune sweep over tune.space, ASHA on validation AP."""
from jobs import entrypoint

main = entrypoint("tune")

if __name__ == "__main__":
    raise SystemExit(main())
