import os
import re


from nnunetv2_desd.common.checkpoint import atomic_save, load_checkpoint
from nnunetv2_desd.pretraining.engine.progress import ProgressLog

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def test_log_file_and_messages(tmp_path, capsys):
    log = ProgressLog(str(tmp_path))
    name = os.path.basename(log.log_file)
    assert re.fullmatch(r'training_log_\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.txt', name)
    log.log('epoch', 3, 'loss', 0.5)
    log.log('second line')
    lines = open(log.log_file).read().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r'\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}: epoch 3 loss 0\.5', lines[0])
    assert lines[1].endswith(': second line')
    assert 'second line' in capsys.readouterr().out


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    log = ProgressLog(str(tmp_path), is_main=False)
    log.log('hidden')
    log.record(0, loss=1.0)
    log.plot()
    assert os.listdir(tmp_path) == []
    assert 'hidden' not in capsys.readouterr().out


def test_plot_writes_png_atomically(tmp_path):
    log = ProgressLog(str(tmp_path))
    for epoch in range(4):
        log.record(epoch, loss=5.0 - epoch, teacher_temp=0.04 + 0.01 * epoch, teacher_momentum=0.996,
                   lr=1e-3 / (epoch + 1), epoch_time=12.5)
    log.plot()
    png = tmp_path / 'progress.png'
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    log.plot()  # overwriting works and leaves no temp files
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(log.log_file), 'progress.png'])


def test_record_overwrites_replayed_epoch_and_state_round_trip(tmp_path):
    log = ProgressLog(str(tmp_path))
    log.record(0, loss=3.0, lr=0.1)
    log.record(1, loss=2.0, lr=0.05)
    log.record(1, loss=1.5)  # epoch 1 re-run after a resume
    assert log.history['loss'] == {'epoch': [0, 1], 'value': [3.0, 1.5]}
    assert log.history['lr'] == {'epoch': [0, 1], 'value': [0.1, 0.05]}
    atomic_save({'progress': log.state_dict()}, str(tmp_path / 'c.pth'))
    restored = ProgressLog(str(tmp_path / 'resumed'))
    restored.load_state_dict(load_checkpoint(str(tmp_path / 'c.pth'))['progress'])
    assert restored.state_dict() == log.state_dict()
    restored.record(2, loss=1.0)
    assert restored.history['loss']['value'] == [3.0, 1.5, 1.0]
    assert log.history['loss']['value'] == [3.0, 1.5]  # no shared lists
