from tracehook.cli import run

run()
