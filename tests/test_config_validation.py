"""Config values of the wrong type or impossible values, from `--set` flags or a YAML file, end the `s3` command with
status 2 and one line naming the key, the value and what is allowed - never a traceback, never a started run."""
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')


def s3(*args, outputs=None):
    env = {**os.environ, **({'S3_NBS_OUTPUTS': str(outputs)} if outputs else {})}
    return subprocess.run([S3, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize('assignment,words', [
    ("data.split_fracs=[0.6,0.2,'x']", "data.split_fracs: [0.6, 0.2, 'x'] is not allowed (data.split_fracs[2] = 'x'); allowed: a list, each item a number"),
    ('data.split_fracs=[0.6,0.6,-0.2]', 'data.split_fracs: [0.6, 0.6, -0.2] is not allowed; allowed: 3 fractions, each in [0, 1], summing to 1'),
    ('train.ppo_micro_batch_size=0', 'train.ppo_micro_batch_size: 0 is not allowed; allowed: >= 1'),
    ('train.ppo_micro_batch_size=3', 'train.ppo_mini_batch_size = 4, train.samples_per_prompt = 1, train.ppo_micro_batch_size = 3 are not allowed together'),
    ('generator.timeout_s=fast', "generator.timeout_s: 'fast' is not allowed; allowed: a number"),
    ('searcher.top_p=2', 'searcher.top_p: 2.0 is not allowed; allowed: between 0 and 1'),
    ('data.n_train=-5', 'data.n_train: -5 is not allowed; allowed: >= 0'),
])
def test_bad_value_is_one_clear_line(assignment, words):
    r = s3('config', '--config', 'smoke', '--set', assignment)
    assert r.returncode == 2, r.stdout + r.stderr
    assert words in r.stderr and 'Traceback' not in r.stderr and r.stderr.count('\n') == 1, r.stderr


def test_bad_yaml_value_names_the_file_and_key(tmp_path):
    p = tmp_path/'mine.yaml'
    p.write_text('train:\n  ppo_micro_batch_size: 0\n')
    r = s3('config', '--config', str(p))
    assert r.returncode == 2 and f'{p}: train.ppo_micro_batch_size: 0 is not allowed' in r.stderr, r.stderr
    p.write_text("data:\n  split_fracs: [0.6, 0.2, x]\n")
    r = s3('config', '--config', str(p))
    assert r.returncode == 2 and f"{p}: data.split_fracs: [0.6, 0.2, 'x'] is not allowed" in r.stderr, r.stderr


def test_run_refuses_before_starting(tmp_path):
    r = s3('run', '01_prepare_data', '--set', 'train.ppo_micro_batch_size=0', outputs=tmp_path)
    assert r.returncode == 2 and 'train.ppo_micro_batch_size: 0 is not allowed' in r.stderr, r.stderr
    assert not (tmp_path/'runs').exists(), 'nothing may be written for a refused run'
