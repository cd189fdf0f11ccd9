# The two commands of the README.
.PHONY: deploy test lab

deploy:  ## set up the virtualenv, log in to the local file backend, `pulumi up` the dev stack
	scripts/deploy

test:    ## install everything and run the whole suite, kernel lab included
	scripts/test

lab:     ## only the kernel lab tests (one VM boot); LAB_ARGS="tests/lab/test_seed.py -k esp"
	scripts/install-deps && .venv/bin/python -m lab run $(LAB_ARGS)
