# The two commands of the README. Everything else is in scripts/ and deploy/local/.
.PHONY: demo test deny stack-up stack-down

## Run the main job end to end on a local stack and show the result.
demo:
	bash scripts/demo.sh

## Install what is missing, start the stack, run every test and lint, stop the stack.
test:
	bash scripts/test.sh

## Only the supply-chain step of `make test`: cargo deny, offline (see deny.toml).
deny:
	bash scripts/test.sh --supply-chain

stack-up:
	bash deploy/local/stack.sh up

stack-down:
	bash deploy/local/stack.sh down
