from tolcli.cli import run

run()
