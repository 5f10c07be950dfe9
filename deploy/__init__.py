"""Deploy helper: ``python -m deploy package|plan|apply|destroy|doctor``.

Runs the Terraform (and, for the first deploy or a local image build, gcloud)
commands of docs/DEPLOY.md in order, with the right variables. It is not part
of any deployable and uses only the standard library, so it also runs in
Cloud Build's Terraform image.
"""
